"""The engine's entry points: the ``vqim`` commands (:mod:`.cli`), the HTTP server (:mod:`.serve`)
and the one engine factory they share (:mod:`.factory`)."""
