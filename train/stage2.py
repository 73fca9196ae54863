"""Stage 2: the image-token predictor (text encoder + AR decoder of the engine's ``VQIMModel``)
on the tokens of a frozen stage-1 tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqim.engine.config import ModelConfig
from vqim.engine.models import VQIMModel, init_weights
from vqim.engine.text import ByteTokenizer, SentencePieceTokenizer, TextTokenizer

from .checkpoint import blame, read_checkpoint
from .config import TrainConfig
from .data import ImageDataset, batch_indices
from .precision import fp32_layer_norms
from .run import ModelRun, build_optimizer


class PredictorForward(nn.Module):
    """Stage-2 forward: (text encoder) + AR decoder, teacher forcing, logits in fp32."""

    def __init__(self, model: VQIMModel):
        super().__init__()
        self.text = model.text
        self.decoder = model.decoder

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """prefix ``[B, 1]``, tokens ``[B, n]`` -> logits ``[B, 1 + n, V]`` float32."""
        memory = self.text(text_ids, text_mask) if self.text is not None else None  # (B, L, W)
        dec = self.decoder
        h = dec(prefix, tokens, memory, text_mask, hidden_layer=dec.cfg.layers - 1)  # (B, 1 + n, W)
        with torch.autocast(h.device.type, enabled=False):
            return dec.head(dec.norm(h.float())).float()



def load_tokenizer_weights(path: str | Path, cfg: ModelConfig) -> dict:
    """The ViT-VQGAN state dict from a stage-1 checkpoint or an engine model directory."""
    got, state = read_tokenizer(path, "tokenizer_checkpoint")
    if got != cfg.vqgan:
        raise ValueError(f"tokenizer_checkpoint: its tokenizer config {got} differs from the model's {cfg.vqgan}")
    return state


def read_tokenizer(path: str | Path, what: str) -> tuple:
    """``(VQGANConfig, state dict)`` of the tokenizer in a stage-1/2 checkpoint or a model directory
    (``what`` names the config field in errors)."""
    p = Path(path)
    if p.is_dir():
        from vqim.engine.weights import load_model

        model = load_model(p)
        got, state = model.cfg.vqgan, {k: v.float() for k, v in model.vqgan.state_dict().items()}
    elif p.is_file():
        ckpt = read_checkpoint(p, what)
        if ckpt["stage"] == "stage1":
            state = ckpt["model"]
        else:
            state = {k[len("vqgan."):]: v for k, v in ckpt["model"].items() if k.startswith("vqgan.")}
        with blame(what, p):
            got = ModelConfig.from_dict(ckpt["model_config"]).vqgan
    else:
        raise ValueError(f"{what}: no such file or directory {p}")
    return got, state


@torch.no_grad()
def load_weights_from(model: VQIMModel, path: Path, *, skip: tuple[str, ...]) -> None:
    """``init_from``: every weight of ``model`` not under a ``skip`` prefix, from the model
    directory ``path`` (same shapes; a decoder's conv mask may differ: it is not a weight). The
    directory's other modules (one ``model`` lacks) are not read."""
    from vqim.engine.weights import load_model

    if not path.is_dir():
        raise ValueError(f"init_from: {path} is not a model directory")
    with blame("init_from", path):
        src = load_model(path).state_dict()
        want = [k for k in model.state_dict() if not k.startswith(skip)]
        missing = [k for k in want if k not in src]
        if missing:
            raise ValueError(f"it lacks weights the model needs: {missing[:4]}")
        # A shape that does not match raises here, named by blame.
        model.load_state_dict({k: src[k].float() for k in want}, strict=False)


def text_tokenizer(path: str | None, max_len: int) -> TextTokenizer:
    return TextTokenizer(SentencePieceTokenizer(path) if path else ByteTokenizer(), max_len)


class Stage2(ModelRun):
    """Image-token prediction: cross-entropy over tokens of the frozen stage-1 tokenizer."""

    stage = "stage2"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        mc = self.model_cfg
        mc.require_decoder("stage2 training")
        mc.decoder.dropout = cfg.dropout
        if mc.text is not None:
            mc.text.dropout = cfg.dropout
        if cfg.tokenizer_checkpoint is None:
            raise ValueError("stage2 needs tokenizer_checkpoint (the stage-1 checkpoint or a model directory)")
        self.model = VQIMModel(mc).to(self.device)
        init_weights(self.model, cfg.seed)
        tokenizer_state = load_tokenizer_weights(cfg.tokenizer_checkpoint, mc)
        with blame("tokenizer_checkpoint", Path(cfg.tokenizer_checkpoint)):
            self.model.vqgan.load_state_dict(tokenizer_state)
        self.model.vqgan.requires_grad_(False).eval()
        if cfg.init_from is not None:
            load_weights_from(self.model, Path(cfg.init_from), skip=("vqgan.", "scorer."))
        fp32_layer_norms(self.model)
        self.data = ImageDataset(cfg.data, mc.vqgan.image_size)
        self.tokens = self._encode_images()  # (N, n) int32
        self.kind = "text" if mc.is_text_to_image else ("class" if mc.decoder.num_classes > 0 else "uncond")
        if self.kind == "text":
            self.tok = text_tokenizer(cfg.text_tokenizer, mc.text.max_len)
            if self.tok.vocab_size > mc.text.vocab_size:
                raise ValueError(f"text_tokenizer has {self.tok.vocab_size} ids but text.vocab_size is "
                                 f"{mc.text.vocab_size}")
            # Tokenized once, by the tokenizer's own padding; the last row is the engine's
            # unconditional prompt "" ([EOS]), which a dropped caption reads.
            self.text_ids, self.text_mask = self.tok.batch(self.data.captions + [""], torch.device("cpu"),
                                                           pad_to=mc.text.max_len)  # (N + 1, max_len)
        elif self.kind == "class":
            self.labels = torch.tensor(self.data.labels, dtype=torch.long)
            if int(self.labels.max()) >= mc.decoder.num_classes:
                raise ValueError(f"data: label {int(self.labels.max())} >= num_classes {mc.decoder.num_classes}")
        self.net = self.wrap(PredictorForward(self.model))
        params = [p for n, p in self.model.named_parameters() if not n.startswith("vqgan.")]
        self.opt = build_optimizer(cfg.optimizer or "adafactor8", params, cfg.lr, cfg.weight_decay)

    @torch.no_grad()
    def _encode_images(self) -> torch.Tensor:
        vq = self.model.vqgan
        out = []
        for i in range(0, len(self.data), 64):
            x = self.data.pixels(range(i, min(i + 64, len(self.data)))).to(self.device)
            out.append(vq.encode(x).flatten(1).to(torch.int32).cpu())
        return torch.cat(out)

    def batch(self, step: int) -> dict:
        """The rank's shard of the global batch of ``step``: prefix, tokens, text (condition-dropped)."""
        cfg, mc = self.cfg, self.model_cfg
        idx = batch_indices(len(self.data), cfg.batch_size, step, cfg.seed)  # global
        drop = torch.rand(cfg.batch_size, generator=self.cond_gen) < cfg.cond_dropout  # global
        tokens = self.tokens[idx].long()  # (B, n)
        prefix = torch.full((cfg.batch_size, 1), mc.decoder.num_classes, dtype=torch.long)
        out = {}
        if self.kind == "class":
            prefix[:, 0] = torch.where(drop, mc.decoder.num_classes, self.labels[idx])
        if self.kind == "text":
            rows = torch.where(drop, len(self.data), idx)  # (B,)
            mask = self.text_mask[rows]  # (B, max_len)
            length = int(mask.sum(1).max())  # padded to the batch's longest caption
            ids, mask = self.text_ids[rows, :length], mask[:, :length]  # (B, L)
            out = {"text_ids": self.shard(ids).to(self.device), "text_mask": self.shard(mask).to(self.device)}
        return {"prefix": self.shard(prefix).to(self.device), "tokens": self.shard(tokens).to(self.device), **out}

    def loss(self, b: dict) -> torch.Tensor:
        tokens = b["tokens"]
        with self.autocast():
            logits = self.net(b["prefix"], tokens[:, :-1], b.get("text_ids"), b.get("text_mask"))  # (b, n, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    def train_step(self, step: int) -> dict:
        self.net.train()
        self.model.vqgan.eval()
        loss = self.loss(self.batch(step))
        loss.backward()
        self.check_finite(step, "the loss", loss)
        rec = {"loss": self.dist.all_mean(loss.detach()).item()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        rec["grad_norm"] = self.clip_and_step(step, params, self.opt, "model")
        return rec
