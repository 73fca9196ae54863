"""The reranker: a contrastive image-text dual encoder (``VQIMModel.scorer``) trained on
image-caption pairs (CLIP's loss; CoCa's contrastive half, seed §[0116]).

The rest of the model (tokenizer, text encoder, decoder) is loaded from ``init_from`` and left as
it is; only the scorer trains, so the checkpoint exports with ``vqim train export`` into a model
directory that generates as before and now also reranks. Each batch scores every image against
every caption in it, plus, for the shapes grammar, one hard negative per caption: the caption
with one attribute of one shape changed (kept out of the held-out descriptions), so the scorer
learns the attributes a prompt names rather than only telling scenes apart.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from vqim.engine.models import VQIMModel, init_weights

from . import shapes as S
from .config import TrainConfig
from .data import ImageDataset, batch_indices, to_pixels
from .run import ModelRun, build_optimizer
from .stage2 import load_weights_from, text_tokenizer


def hard_negative(text: str, rng: random.Random) -> str | None:
    """``text`` with one attribute of one shape changed (shape, color, size or position), never a
    held-out description; None if the caption is not of the shapes grammar."""
    try:
        specs = S.parse_caption(text)
    except ValueError:
        return None
    if not specs or any(s.size is None or s.position is None for s in specs):
        return None
    for _ in range(8):
        i = rng.randrange(len(specs))
        spec = specs[i]
        field = rng.choice(("shape", "color", "size", "position"))
        pool = {"shape": S.SHAPES, "color": sorted(S.COLORS), "size": S.SIZES,
                "position": sorted(S.POSITIONS)}[field]
        value = rng.choice([v for v in pool if v != getattr(spec, field)])
        new = S.ShapeSpec(**{**spec.__dict__, field: value})
        others = [s.position for j, s in enumerate(specs) if j != i]
        if new in S.HELD_OUT or new.position in others:
            continue
        return S.caption(specs[:i] + [new] + specs[i + 1:])
    return None


class ScorerRun(ModelRun):
    """Contrastive training of ``model.scorer`` on the images and captions of ``data``."""

    stage = "scorer"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        mc = self.model_cfg
        if mc.scorer is None:
            raise ValueError("the scorer stage needs a model config with a 'scorer' section")
        if cfg.init_from is None:
            raise ValueError("the scorer stage needs init_from: the model directory the scorer is added to")
        self.model = VQIMModel(mc).to(self.device)
        init_weights(self.model, cfg.seed)
        load_weights_from(self.model, Path(cfg.init_from), skip=("scorer.",))
        self.model.requires_grad_(False)
        self.model.scorer.requires_grad_(True)
        self.data = ImageDataset(cfg.data, mc.vqgan.image_size)
        self.captions = self.data.captions  # built once: the dataset makes the list anew on each read
        if any(c is None for c in self.captions):
            raise ValueError(f"data: {cfg.data} has images without captions; the scorer learns from captions")
        self.val = ImageDataset(cfg.val_data or cfg.data, mc.vqgan.image_size, limit=cfg.val_images)
        self.tok = text_tokenizer(cfg.text_tokenizer, mc.text.max_len)
        self.net = self.wrap(self.model.scorer)
        self.opt = build_optimizer(cfg.optimizer or "adamw", list(self.model.scorer.parameters()), cfg.lr,
                                   cfg.weight_decay)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        idx = self.shard(batch_indices(len(self.data), cfg.batch_size, step, cfg.seed))
        x = self.data.pixels(idx).to(self.device)  # (b, 3, H, W)
        captions = [self.captions[i] for i in idx.tolist()]
        rng = random.Random(f"scorer/{cfg.seed}/{step}")
        negatives = [n for n in (hard_negative(c, rng) for c in captions) if n is not None]
        ids, mask = self.tok.batch(captions + negatives, self.device, pad_to=self.model_cfg.text.max_len)  # (b + k, L)
        self.net.train()
        with self.autocast():
            logits = self.net(x, ids, mask).float()  # (b, b + negatives)
        target = torch.arange(len(captions), device=self.device)
        # Images choose among all captions (hard negatives too); captions among the images.
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(captions)].T, target))
        loss.backward()
        self.check_finite(step, "the loss", loss)
        rec = {"loss": self.dist.all_mean(loss.detach()).item()}
        rec["grad_norm"] = self.clip_and_step(step, self.model.scorer.parameters(), self.opt, "scorer")
        with torch.no_grad():
            self.model.scorer.log_scale.clamp_(max=4.6052)  # CLIP's cap: a scale of at most 100
        return rec

    @torch.no_grad()
    def validate(self) -> dict:
        return retrieval_accuracy(self.model.scorer, self.tok, self.val, self.model_cfg.text.max_len,
                                  device=self.device)


@torch.no_grad()
def retrieval_accuracy(scorer, tok, data: ImageDataset, max_len: int, *, batch_size: int = 100,
                       device: torch.device | str = "cpu") -> dict:
    """Top-1 retrieval in groups of ``batch_size``: each image's caption among the group's, and
    each image's caption against its hard negative."""
    was = scorer.training
    scorer.eval()
    hits = pairs = wins = tried = 0
    rng = random.Random("scorer/validate")
    captions = data.captions
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        x = data.pixels(rows).to(device)
        caps = [captions[i] for i in rows]
        ids, mask = tok.batch(caps, device, pad_to=max_len)
        img = scorer.embed_images(x)  # (b, E)
        sim = img @ scorer.embed_text(ids, mask).T  # (b, b)
        hits += int((sim.argmax(1) == torch.arange(len(caps), device=device)).sum())
        pairs += len(caps)
        negs = [hard_negative(c, rng) for c in caps]
        keep = [i for i, n in enumerate(negs) if n is not None]
        if keep:
            nid, nmask = tok.batch([negs[i] for i in keep], device, pad_to=max_len)
            wrong = (img[keep] * scorer.embed_text(nid, nmask)).sum(-1)
            wins += int((sim.diagonal()[keep] > wrong).sum())
            tried += len(keep)
    scorer.train(was)
    return {"retrieval_top1": hits / max(1, pairs), "beats_hard_negative": wins / max(1, tried)}


def held_out_retrieval(engine, *, num_images: int = 200, seed: int = 0, group: int = 100) -> dict:
    """The scorer's accuracy on held-out scenes rendered fresh: :func:`retrieval_accuracy` over
    images of held-out descriptions (``engine``: a vqim Engine with a scorer)."""
    rng = random.Random(f"scorer/held_out/{seed}")
    size = engine.cfg.vqgan.image_size
    scenes = [S.sample_scene(rng, split="held_out") for _ in range(num_images)]
    data = _RenderedScenes([S.render(sc, size, rng) for sc in scenes], [S.caption(sc) for sc in scenes])
    return retrieval_accuracy(engine.model.scorer, engine.tokenizer, data, engine.cfg.text.max_len, batch_size=group,
                              device=engine.device)


class _RenderedScenes:
    """The two things :func:`retrieval_accuracy` reads of a dataset, for images in memory."""

    def __init__(self, images, captions: list[str]):
        self.captions = captions
        self._x = to_pixels(images)  # (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, rows) -> torch.Tensor:
        return self._x[list(rows)]

