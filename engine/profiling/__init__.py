"""Instrumentation: timing and the roofline (:mod:`.timing`), the end-to-end benchmark of ``vqim
bench`` (:mod:`.bench`), the launch counter (:mod:`.launches`), and the spawner of local
tensor-parallel ranks for tests and benchmarks (:mod:`.ranks`)."""
