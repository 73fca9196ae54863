"""Model configurations: dataclasses with derived fields and a preset table.

One ``ModelConfig`` describes a whole generator: an image tokenizer (the ViT-VQGAN,
``VQGANConfig``, or the CNN VQ-16 of LlamaGen and Janus-Pro, ``CNNVQConfig``), an optional text
encoder (encoder-decoder, Parti-style) or prompt in the decoder's own sequence (Janus-Pro,
``PromptConfig``), and the autoregressive image decoder: Parti's (``DecoderConfig``: cross-attention
or a class/BOS prefix) or a Llama-style one (``LlamaDecoderConfig``: RMSNorm, SwiGLU, RoPE, a class
prefix or the prompt). A config with no decoder is a tokenizer alone (the ``vit-vqgan-*`` presets):
it encodes and decodes images only. Shapes of the paper's presets follow the seed text (Table 2,
§[0110], §[0117]-[0122]); ``janus-pro-*`` and ``llamagen-c2i-*`` are the public models' shapes;
``tiny-*`` presets are for tests and CPU smoke runs. Configs round-trip through ``config.json``
(``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        dtype_from_name(dtype)
        return dtype
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")


# Upper bounds of the size fields. Generous (parti-20b is width 4096, MLP 16384, 64 decoder
# layers; no preset comes near them) but finite: a config.json is user input, and building a
# model it describes must not be the first thing to find out that it asks for 10**12 layers.
MAX_LAYERS = 1024
MAX_WIDTH = 65536  # width, code_dim, memory_dim
MAX_MLP_DIM = 4 * MAX_WIDTH
MAX_HEADS = 1024
MAX_VOCAB = 2**20  # codebook_size, vocab_size, num_classes
MAX_IMAGE_SIZE = 8192  # pixels a side (and patch_size)
MAX_TEXT_LEN = 8192  # text positions
MAX_GRID = 1024  # image tokens a side
MAX_KERNEL = 2 * MAX_GRID + 1  # a window this wide already spans any grid
MAX_SUPERRES_SCALE = 8  # pixel shuffle by more than 8 a side makes 192+ channels of one conv


def short_repr(v: object, n: int = 80) -> str:
    """``repr(v)`` cut to ``n`` characters: values quoted in errors may come from untrusted files."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(obj: object, name: str, lo: int, hi: int) -> None:
    v = getattr(obj, name)
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int in [{lo}, {hi}], got {short_repr(v)}")


def _check_sizes(obj: object, **bounds: int) -> None:
    """Each named field is an int in [1, bound]."""
    for name, hi in bounds.items():
        _check_int(obj, name, 1, hi)


def _check_choice(obj: object, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {short_repr(v)}")


def _check_dropout(obj: object) -> None:
    v = obj.dropout  # type: ignore[attr-defined]
    # "not 0 <= v < 1" rather than "v < 0 or v >= 1", so that NaN is refused too.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise ValueError(f"{type(obj).__name__}.dropout must be a number in [0, 1), got {short_repr(v)}")


def _check_heads(obj: object) -> None:
    if obj.width % obj.heads:  # type: ignore[attr-defined]
        raise ValueError(f"{type(obj).__name__}: width {obj.width} must be divisible by heads {obj.heads}")  # type: ignore[attr-defined]


def _fields_from_dict(cls: type, d: object, section: str) -> object:
    """``cls(**d)`` for one section of config.json, naming what is wrong instead of a TypeError."""
    if not isinstance(d, dict):
        raise ValueError(f"config section {section!r} must be a JSON object of {cls.__name__} fields, "
                         f"got {short_repr(d)}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in d:
        if key not in known:
            raise ValueError(f"unknown key {short_repr(key)} in config section {section!r}; {cls.__name__} fields: "
                             f"{known}")
    return cls(**d)


@dataclass
class VQGANConfig:
    """ViT-VQGAN image tokenizer. ``width``/``layers``/``heads``/``mlp_dim`` shape the encoder;
    the decoder takes its own ``dec_*`` (seed §[0106]: a small tokenizer's encoder and codebook,
    frozen, with a larger decoder fine-tuned on them), each the encoder's when null."""

    image_size: int = 256
    patch_size: int = 8
    width: int = 512
    layers: int = 8
    heads: int = 8
    mlp_dim: int = 2048
    codebook_size: int = 8192
    code_dim: int = 32
    # "sigmoid": the decoder predicts the logit-Laplace mean in [0, 1] (seed §[0091]);
    # "raw": no output activation (pixels are clamped only when converted to images).
    output: str = "sigmoid"
    dropout: float = 0.0
    dec_width: int | None = None
    dec_layers: int | None = None
    dec_heads: int | None = None
    dec_mlp_dim: int | None = None
    # Derived.
    grid: int = field(init=False)
    head_dim: int = field(init=False)
    patch_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _check_sizes(self, image_size=MAX_IMAGE_SIZE, patch_size=MAX_IMAGE_SIZE, width=MAX_WIDTH, layers=MAX_LAYERS,
                     heads=MAX_HEADS, mlp_dim=MAX_MLP_DIM, codebook_size=MAX_VOCAB, code_dim=MAX_WIDTH)
        _check_choice(self, "output", ("sigmoid", "raw"))
        _check_dropout(self)
        _check_heads(self)
        # A null decoder size is the encoder's, resolved here so configs compare by their shapes.
        for name in ("width", "layers", "heads", "mlp_dim"):
            if getattr(self, "dec_" + name) is None:
                setattr(self, "dec_" + name, getattr(self, name))
        _check_sizes(self, dec_width=MAX_WIDTH, dec_layers=MAX_LAYERS, dec_heads=MAX_HEADS, dec_mlp_dim=MAX_MLP_DIM)
        if self.dec_width % self.dec_heads:
            raise ValueError(f"VQGANConfig: dec_width {self.dec_width} must be divisible by dec_heads {self.dec_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VQGANConfig.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size
        self.head_dim = self.width // self.heads
        self.patch_dim = 3 * self.patch_size * self.patch_size


@dataclass
class CNNVQConfig:
    """The CNN VQ tokenizer of LlamaGen (VQ-16) and Janus-Pro (its ``gen_vision_model``): a
    GroupNorm ResNet encoder that halves the resolution ``len(channel_mult) - 1`` times, a mid
    attention block, codes of ``code_dim`` l2-normalized at lookup, and the mirrored decoder.
    Pixels in [-1, 1] inside; the engine's [0, 1] outside."""

    kind: str = "cnn"
    image_size: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    code_dim: int = 8
    # Derived.
    grid: int = field(init=False)

    def __post_init__(self) -> None:
        _check_choice(self, "kind", ("cnn",))
        _check_sizes(self, image_size=MAX_IMAGE_SIZE, base_channels=MAX_WIDTH, num_res_blocks=MAX_LAYERS,
                     z_channels=MAX_WIDTH, codebook_size=MAX_VOCAB, code_dim=MAX_WIDTH)
        m = self.channel_mult
        if (not isinstance(m, (list, tuple)) or not 1 <= len(m) <= 8
                or not all(_is_int(i) and 1 <= i <= 64 for i in m)):
            raise ValueError(f"CNNVQConfig.channel_mult must be a list of 1 to 8 ints in [1, 64], got {short_repr(m)}")
        self.channel_mult = tuple(m)
        for c in (self.base_channels * i for i in (1, *m)):
            if c % 32:
                raise ValueError(f"CNNVQConfig: base_channels {self.base_channels} times each channel_mult must be a "
                                 "multiple of 32 (the GroupNorm groups)")
        down = 2 ** (len(m) - 1)
        if self.image_size % down:
            raise ValueError(f"CNNVQConfig.image_size {self.image_size} must be a multiple of {down} (2 to the number "
                             "of downsamplings)")
        self.grid = self.image_size // down


@dataclass
class PromptConfig:
    """A prompt in the decoder's own sequence (Janus-Pro): its tokenizer (``"janus"``: the model
    directory's ``tokenizer.json`` through the ``tokenizers`` package, and Janus's generation
    template), the text vocabulary the decoder embeds, the longest prompt kept, and the special
    ids the template and the unconditional branch need."""

    vocab_size: int = 102400
    max_len: int = 128
    tokenizer: str = "janus"
    pad_id: int = 100015
    bos_id: int = 100000
    boi_id: int = 100016

    def __post_init__(self) -> None:
        _check_sizes(self, vocab_size=MAX_VOCAB, max_len=MAX_TEXT_LEN)
        _check_choice(self, "tokenizer", ("janus",))
        for name in ("pad_id", "bos_id", "boi_id"):
            _check_int(self, name, 0, self.vocab_size - 1)


@dataclass
class TextEncoderConfig:
    """Bidirectional transformer over sentencepiece ids (Parti's text encoder)."""

    vocab_size: int = 16000  # seed §[0123]: a sentencepiece model of 16,000 pieces
    max_len: int = 128
    width: int = 1024
    layers: int = 12
    heads: int = 16
    mlp_dim: int = 4096
    dropout: float = 0.1
    # "bytes": the byte-level fallback (any prompt, no file); "sentencepiece": the model
    # directory must hold the tokenizer.model the encoder was trained with.
    tokenizer: str = "bytes"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _check_sizes(self, vocab_size=MAX_VOCAB, max_len=MAX_TEXT_LEN, width=MAX_WIDTH, layers=MAX_LAYERS,
                     heads=MAX_HEADS, mlp_dim=MAX_MLP_DIM)
        _check_choice(self, "tokenizer", ("bytes", "sentencepiece"))
        _check_dropout(self)
        _check_heads(self)
        self.head_dim = self.width // self.heads


@dataclass
class DecoderConfig:
    """Autoregressive image-token decoder.

    The sequence is ``prefix`` position(s) followed by image tokens in raster order. The prefix
    token is a class id (``num_classes > 0``) or BOS; its embedding table has one extra row,
    index ``num_classes``, which is BOS for unconditional models and the "null class" used as
    the unconditional branch of classifier-free guidance for class-conditional ones.
    """

    vocab_size: int = 8192
    grid_h: int = 32
    grid_w: int = 32
    width: int = 1024
    layers: int = 12
    heads: int = 16
    mlp_dim: int = 4096
    num_classes: int = 0
    cross_attention: bool = False
    memory_dim: int = 0  # width of the text encoder's output (cross-attention K/V input)
    conv_kernel: tuple[int, int] = (11, 11)
    # Layers using the conv-shaped mask (DESIGN §4); None means all. Others are fully causal.
    conv_layers: tuple[int, ...] | None = None
    dropout: float = 0.1
    # Derived.
    prefix: int = field(init=False)
    num_tokens: int = field(init=False)
    head_dim: int = field(init=False)
    max_seq: int = field(init=False)

    def __post_init__(self) -> None:
        _check_sizes(self, vocab_size=MAX_VOCAB, grid_h=MAX_GRID, grid_w=MAX_GRID, width=MAX_WIDTH, layers=MAX_LAYERS,
                     heads=MAX_HEADS, mlp_dim=MAX_MLP_DIM)
        _check_int(self, "num_classes", 0, MAX_VOCAB)
        _check_int(self, "memory_dim", 0, MAX_WIDTH)
        _check_dropout(self)
        if not isinstance(self.cross_attention, bool):
            raise ValueError("DecoderConfig.cross_attention must be true or false, "
                             f"got {short_repr(self.cross_attention)}")
        _check_heads(self)
        k = self.conv_kernel
        if (not isinstance(k, (list, tuple)) or len(k) != 2
                or not all(_is_int(i) and 1 <= i <= MAX_KERNEL and i % 2 for i in k)):
            raise ValueError(f"DecoderConfig.conv_kernel must be a list of two odd ints in [1, {MAX_KERNEL}], "
                             f"got {short_repr(k)}")
        self.conv_kernel = tuple(k)  # type: ignore[assignment]
        if self.conv_layers is not None:
            c = self.conv_layers
            if (not isinstance(c, (list, tuple)) or not all(_is_int(i) and 0 <= i < self.layers for i in c)
                    or len(set(c)) != len(c)):
                raise ValueError(f"DecoderConfig.conv_layers must be null (all layers) or a list of distinct ints in "
                                 f"[0, {self.layers}), got {short_repr(c)}")
            self.conv_layers = tuple(c)
        if self.cross_attention and self.memory_dim < 1:
            raise ValueError("DecoderConfig.memory_dim must be set (>= 1) when cross_attention is on")
        self.prefix = 1
        self.num_tokens = self.grid_h * self.grid_w
        self.head_dim = self.width // self.heads
        # The last image token is sampled, never fed back, so it needs no cache slot.
        self.max_seq = self.prefix + self.num_tokens - 1

    def uses_conv(self, layer: int) -> bool:
        return self.conv_layers is None or layer in self.conv_layers


@dataclass
class LlamaDecoderConfig:
    """A Llama-style image-token decoder (LlamaGen's GPT, Janus-Pro's language model): RMSNorm,
    SwiGLU MLP, rotary positions, grouped-query attention (``kv_heads``), every layer causal.

    The sequence is a prefix, then the image tokens. The prefix is one class token
    (``num_classes > 0``: a table of ``num_classes + 1`` rows, the last the null class of
    guidance; LlamaGen c2i) or the prompt's tokens (``prompt_vocab``: Janus-Pro), each row its own
    length. ``rope="2d"`` is LlamaGen's table (angles of the grid row and column, zero on the
    class token, pairs interleaved); ``"1d"`` Hugging Face Llama's (angles of the position, halves
    rotated). ``image_embed="aligned"`` embeds a code with Janus's ``gen_embed`` (``embed_dim``) and
    aligner MLP (``aligner_layers`` linears, GELU between), ``"table"`` with one table of ``width``;
    ``head="mlp"`` is Janus's generation head (``head_dim`` hidden, GELU), ``"linear"`` one linear.
    """

    block: str = "llama"
    vocab_size: int = 16384
    grid_h: int = 16
    grid_w: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    kv_heads: int = 16
    mlp_dim: int = 2816
    norm_eps: float = 1e-5
    rope: str = "2d"
    rope_theta: float = 10000.0
    num_classes: int = 0
    prompt_vocab: int = 0
    max_prompt_len: int = 0
    image_embed: str = "table"
    embed_dim: int = 0
    aligner_layers: int = 2
    head: str = "linear"
    head_dim_mlp: int = 0
    # Derived.
    prefix: int = field(init=False)  # the longest prefix a row can have
    num_tokens: int = field(init=False)
    head_dim: int = field(init=False)
    max_seq: int = field(init=False)
    cross_attention: bool = field(init=False)
    conv_layers: tuple[int, ...] = field(init=False)
    conv_kernel: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        _check_choice(self, "block", ("llama",))
        _check_sizes(self, vocab_size=MAX_VOCAB, grid_h=MAX_GRID, grid_w=MAX_GRID, width=MAX_WIDTH, layers=MAX_LAYERS,
                     heads=MAX_HEADS, kv_heads=MAX_HEADS, mlp_dim=MAX_MLP_DIM, aligner_layers=16)
        _check_int(self, "num_classes", 0, MAX_VOCAB)
        _check_int(self, "prompt_vocab", 0, MAX_VOCAB)
        _check_int(self, "max_prompt_len", 0, MAX_TEXT_LEN)
        _check_int(self, "embed_dim", 0, MAX_WIDTH)
        _check_int(self, "head_dim_mlp", 0, MAX_MLP_DIM)
        _check_choice(self, "rope", ("1d", "2d"))
        _check_choice(self, "image_embed", ("table", "aligned"))
        _check_choice(self, "head", ("linear", "mlp"))
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise ValueError(f"LlamaDecoderConfig.{name} must be a positive number, got {short_repr(v)}")
        _check_heads(self)
        if self.heads % self.kv_heads:
            raise ValueError(f"LlamaDecoderConfig: heads {self.heads} must be divisible by kv_heads {self.kv_heads}")
        self.head_dim = self.width // self.heads
        if self.head_dim % (4 if self.rope == "2d" else 2):
            raise ValueError(f"LlamaDecoderConfig: the head dim {self.head_dim} must be divisible by "
                             f"{4 if self.rope == '2d' else 2} for rope={self.rope!r}")
        if (self.num_classes > 0) == (self.prompt_vocab > 0):
            raise ValueError("LlamaDecoderConfig: exactly one of num_classes (a class prefix) and prompt_vocab (the "
                             "prompt in the sequence) must be set")
        if self.prompt_vocab and self.max_prompt_len < 2:
            raise ValueError("LlamaDecoderConfig.max_prompt_len must be >= 2 when prompt_vocab is set")
        if self.rope == "2d" and self.prompt_vocab:
            raise ValueError("LlamaDecoderConfig: rope='2d' (LlamaGen's) has angles for one class token only; a "
                             "prompt in the sequence takes rope='1d'")
        if self.image_embed == "aligned" and self.embed_dim < 1:
            raise ValueError("LlamaDecoderConfig.embed_dim must be set (>= 1) for image_embed='aligned'")
        if self.head == "mlp" and self.head_dim_mlp < 1:
            raise ValueError("LlamaDecoderConfig.head_dim_mlp must be set (>= 1) for head='mlp'")
        self.prefix = self.max_prompt_len if self.prompt_vocab else 1
        self.num_tokens = self.grid_h * self.grid_w
        # The last image token is sampled, never fed back, so it needs no cache slot.
        self.max_seq = self.prefix + self.num_tokens - 1
        # The Parti decoder's fields the engine reads: no cross-attention, no conv-masked layer.
        self.cross_attention = False
        self.conv_layers = ()
        self.conv_kernel = (1, 1)

    def uses_conv(self, layer: int) -> bool:
        return False


@dataclass
class ScorerConfig:
    """A contrastive image-text dual encoder (CLIP, CoCa's contrastive half) that reranks
    candidates (seed §[0116]): a ViT over the model's images, a transformer over its text ids
    (the model's text tokenizer), each pooled and projected to ``embed_dim``."""

    patch_size: int = 8
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 512
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_dim: int = 512
    embed_dim: int = 128

    def __post_init__(self) -> None:
        _check_sizes(self, patch_size=MAX_IMAGE_SIZE, width=MAX_WIDTH, layers=MAX_LAYERS, heads=MAX_HEADS,
                     mlp_dim=MAX_MLP_DIM, text_width=MAX_WIDTH, text_layers=MAX_LAYERS, text_heads=MAX_HEADS,
                     text_mlp_dim=MAX_MLP_DIM, embed_dim=MAX_WIDTH)
        for w, h in (("width", "heads"), ("text_width", "text_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ValueError(f"ScorerConfig: {w} {getattr(self, w)} must be divisible by {h} {getattr(self, h)}")


@dataclass
class SuperResConfig:
    """The super-resolution module (seed §[0108]): stacked convolutional layers with residual
    connections that map the tokenizer's reconstructions to ``scale`` times their size. A trunk of
    ``blocks`` residual blocks of ``channels`` runs at the input's resolution; one pixel shuffle
    upsamples its residual, which is added to the bicubic upsampling of the input."""

    scale: int = 4
    channels: int = 32
    blocks: int = 4

    def __post_init__(self) -> None:
        _check_int(self, "scale", 2, MAX_SUPERRES_SCALE)
        _check_sizes(self, channels=MAX_WIDTH, blocks=MAX_LAYERS)


@dataclass
class ModelConfig:
    """A whole generator: tokenizer + (text encoder) + AR decoder, in one dtype.

    ``decoder=None`` (and then no text encoder) is a tokenizer-only model."""

    name: str
    vqgan: VQGANConfig | CNNVQConfig
    decoder: DecoderConfig | LlamaDecoderConfig | None
    text: TextEncoderConfig | None = None
    dtype: str = "float32"
    # The prompt in the decoder's own sequence (Janus-Pro); None: none.
    prompt: PromptConfig | None = None
    # The reranker (text models only); None: none.
    scorer: ScorerConfig | None = None
    # The upsampler of decoded images; None: none.
    superres: SuperResConfig | None = None

    def __post_init__(self) -> None:
        if self.scorer is not None:
            if self.text is None:
                raise ValueError(f"{self.name}: a scorer ranks images against text: it needs a text encoder")
            if self.vqgan.image_size % self.scorer.patch_size:
                raise ValueError(f"{self.name}: scorer.patch_size {self.scorer.patch_size} must divide the image size "
                                 f"{self.vqgan.image_size}")
        if not isinstance(self.name, str):
            raise ValueError(f"ModelConfig.name must be a string, got {short_repr(self.name)}")
        if self.superres is not None and self.vqgan.image_size * self.superres.scale > MAX_IMAGE_SIZE:
            raise ValueError(f"{self.name}: superres.scale {self.superres.scale} times the image size "
                             f"{self.vqgan.image_size} must be at most {MAX_IMAGE_SIZE} pixels a side")
        _check_choice(self, "dtype", tuple(_DTYPES))
        d, v = self.decoder, self.vqgan
        if d is None:
            if self.text is not None:
                raise ValueError(f"{self.name}: a text encoder needs a decoder (a tokenizer-only model has neither)")
            return
        if (d.grid_h, d.grid_w) != (v.grid, v.grid):
            raise ValueError(f"{self.name}: decoder grid {d.grid_h}x{d.grid_w} must match the tokenizer grid {v.grid}x{v.grid}")
        if d.vocab_size != v.codebook_size:
            raise ValueError(f"{self.name}: decoder vocab_size {d.vocab_size} must equal codebook_size {v.codebook_size}")
        if (self.text is not None) != d.cross_attention:
            raise ValueError(f"{self.name}: decoder.cross_attention must be on exactly when there is a text encoder")
        if self.text is not None and d.memory_dim != self.text.width:
            raise ValueError(f"{self.name}: decoder.memory_dim {d.memory_dim} must equal text.width {self.text.width}")
        prompt_vocab = getattr(d, "prompt_vocab", 0)
        if (self.prompt is not None) != (prompt_vocab > 0):
            raise ValueError(f"{self.name}: a prompt section goes with a decoder that embeds the prompt (prompt_vocab)")
        if self.prompt is not None and (prompt_vocab != self.prompt.vocab_size or
                                        d.max_prompt_len != self.prompt.max_len):
            raise ValueError(f"{self.name}: decoder.prompt_vocab / max_prompt_len ({prompt_vocab}, {d.max_prompt_len}) "
                             f"must equal prompt.vocab_size / max_len ({self.prompt.vocab_size}, {self.prompt.max_len})")

    @property
    def is_text_to_image(self) -> bool:
        return self.text is not None or self.prompt is not None

    @property
    def is_tokenizer_only(self) -> bool:
        return self.decoder is None

    def require_decoder(self, what: str) -> DecoderConfig:
        """The decoder config, or a ValueError saying ``what`` needs one."""
        if self.decoder is None:
            raise ValueError(f"{self.name} is a tokenizer-only model (no image-token decoder): {what} needs a "
                             "generator such as tiny-t2i or parti-350m; a tokenizer can encode_images and decode_codes")
        return self.decoder

    def to_dict(self) -> dict:
        def plain(c: object) -> dict:
            return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.init}

        def lists(d: dict) -> dict:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        return {
            "name": self.name,
            "dtype": self.dtype,
            "vqgan": lists(plain(self.vqgan)),
            "decoder": None if self.decoder is None else lists(plain(self.decoder)),
            "text": plain(self.text) if self.text is not None else None,
            **({"prompt": plain(self.prompt)} if self.prompt is not None else {}),
            **({"scorer": plain(self.scorer)} if self.scorer is not None else {}),
            **({"superres": plain(self.superres)} if self.superres is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: object) -> ModelConfig:
        """The config of a ``config.json`` (parsed): every key known, every field checked."""
        if not isinstance(d, dict):
            raise ValueError(f"not a vqim model config: must be a JSON object, got {type(d).__name__}")
        for key in d:
            if key not in ("name", "dtype", "vqgan", "decoder", "text", "prompt", "scorer", "superres"):
                raise ValueError(f"unknown key {short_repr(key)} in the model config "
                                 "(name, dtype, vqgan, decoder, text, prompt, scorer, superres)")
        if "vqgan" not in d or "decoder" not in d:
            raise ValueError("not a vqim model config: needs a 'vqgan' section and a 'decoder' section "
                             "(null for a tokenizer-only model)")
        # The family of a section is its 'kind' / 'block' key (absent: the ViT-VQGAN, Parti's decoder).
        vq = CNNVQConfig if isinstance(d["vqgan"], dict) and "kind" in d["vqgan"] else VQGANConfig
        dec = LlamaDecoderConfig if isinstance(d["decoder"], dict) and "block" in d["decoder"] else DecoderConfig
        return cls(
            name=d.get("name", "custom"),
            dtype=d.get("dtype", "float32"),
            vqgan=_fields_from_dict(vq, d["vqgan"], "vqgan"),
            decoder=None if d["decoder"] is None else _fields_from_dict(dec, d["decoder"], "decoder"),
            text=None if d.get("text") is None else _fields_from_dict(TextEncoderConfig, d["text"], "text"),
            prompt=None if d.get("prompt") is None else _fields_from_dict(PromptConfig, d["prompt"], "prompt"),
            scorer=None if d.get("scorer") is None else _fields_from_dict(ScorerConfig, d["scorer"], "scorer"),
            superres=None if d.get("superres") is None else _fields_from_dict(SuperResConfig, d["superres"],
                                                                              "superres"),
        )

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]()


VQGAN_PRESETS = {
    # Table 2 of the seed: blocks / width / heads / MLP; 256 px, patch 8 -> 32 x 32 tokens.
    "vit-vqgan-small": dict(width=512, layers=8, heads=8, mlp_dim=2048),
    "vit-vqgan-base": dict(width=768, layers=12, heads=12, mlp_dim=3072),
    "vit-vqgan-large": dict(width=1280, layers=32, heads=16, mlp_dim=5120),
}


def vqgan_config(name: str) -> VQGANConfig:
    if name not in VQGAN_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose from {sorted(VQGAN_PRESETS)}")
    return VQGANConfig(**VQGAN_PRESETS[name])


def _tokenizer_only(name: str) -> ModelConfig:
    return ModelConfig(name=name, vqgan=vqgan_config(name), decoder=None, dtype="bfloat16")


def _parti(name: str, enc_layers: int, dec_layers: int, width: int, heads: int) -> ModelConfig:
    # The method's tokenizer pairing (seed §[0106]): ViT-VQGAN-Small's encoder and codebook, and
    # a 32-block, 1280-wide decoder fine-tuned on them.
    large = VQGAN_PRESETS["vit-vqgan-large"]
    tokenizer = VQGANConfig(**VQGAN_PRESETS["vit-vqgan-small"], dec_width=large["width"], dec_layers=large["layers"],
                            dec_heads=large["heads"], dec_mlp_dim=large["mlp_dim"])
    return ModelConfig(
        name=name,
        vqgan=tokenizer,
        text=TextEncoderConfig(width=width, layers=enc_layers, heads=heads, mlp_dim=4 * width),
        decoder=DecoderConfig(width=width, layers=dec_layers, heads=heads, mlp_dim=4 * width,
                              cross_attention=True, memory_dim=width),
        dtype="bfloat16",
    )


def _vim(name: str, layers: int, width: int, heads: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        vqgan=vqgan_config("vit-vqgan-base"),
        decoder=DecoderConfig(width=width, layers=layers, heads=heads, mlp_dim=4 * width, num_classes=1000),
        dtype="bfloat16",
    )


def _tiny_vqgan() -> VQGANConfig:
    # 64 px, patch 8 -> 8 x 8 tokens: big enough that an 5 x 5 conv window is a real mask.
    return VQGANConfig(image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128,
                       codebook_size=256, code_dim=8)


def _tiny_t2i() -> ModelConfig:
    return ModelConfig(
        name="tiny-t2i",
        vqgan=_tiny_vqgan(),
        # 384 >= 259 ids of the byte-level fallback tokenizer.
        text=TextEncoderConfig(vocab_size=384, max_len=128, width=64, layers=2, heads=4, mlp_dim=128, dropout=0.0),
        decoder=DecoderConfig(vocab_size=256, grid_h=8, grid_w=8, width=64, layers=2, heads=4, mlp_dim=128,
                              cross_attention=True, memory_dim=64, conv_kernel=(5, 5), dropout=0.0),
    )


def _tiny_vim() -> ModelConfig:
    return ModelConfig(
        name="tiny-vim",
        vqgan=_tiny_vqgan(),
        # Layer 1 fully causal, so both attention kinds are exercised.
        decoder=DecoderConfig(vocab_size=256, grid_h=8, grid_w=8, width=64, layers=2, heads=4, mlp_dim=128,
                              num_classes=10, conv_kernel=(5, 5), conv_layers=(0,), dropout=0.0),
    )


def _janus_pro(name: str, width: int, layers: int, heads: int, mlp_dim: int) -> ModelConfig:
    # DeepSeek's Janus-Pro: a DeepSeek-LLM (Llama architecture, 1D RoPE, RMSNorm eps 1e-6) with the
    # prompt in its sequence, VQ-16 at 384 px (24 x 24 = 576 tokens), the aligner and the MLP head.
    return ModelConfig(
        name=name,
        vqgan=CNNVQConfig(image_size=384),
        decoder=LlamaDecoderConfig(vocab_size=16384, grid_h=24, grid_w=24, width=width, layers=layers, heads=heads,
                                   kv_heads=heads, mlp_dim=mlp_dim, norm_eps=1e-6, rope="1d", prompt_vocab=102400,
                                   max_prompt_len=128, image_embed="aligned", embed_dim=8, head="mlp",
                                   head_dim_mlp=width),
        prompt=PromptConfig(),
        dtype="bfloat16",
    )


def _llamagen_c2i(name: str, layers: int, heads: int, width: int, size: int) -> ModelConfig:
    # LlamaGen's class-conditional GPTs: SwiGLU of find_multiple(8/3 width, 256), 2D RoPE, one
    # class token (1000 ImageNet classes + the null class), VQ-16 at 256 or 384 px.
    mlp = -(-int(2 * 4 * width / 3) // 256) * 256
    grid = size // 16
    return ModelConfig(
        name=name,
        vqgan=CNNVQConfig(image_size=size),
        decoder=LlamaDecoderConfig(vocab_size=16384, grid_h=grid, grid_w=grid, width=width, layers=layers, heads=heads,
                                   kv_heads=heads, mlp_dim=mlp, norm_eps=1e-5, rope="2d", num_classes=1000),
        dtype="bfloat16",
    )


def _tiny_cnn_vq() -> CNNVQConfig:
    # 64 px, three halvings -> 8 x 8 tokens; 32 channels (the GroupNorm's 32 groups).
    return CNNVQConfig(image_size=64, base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                       codebook_size=256, code_dim=8)


def _tiny_janus() -> ModelConfig:
    return ModelConfig(
        name="tiny-janus",
        vqgan=_tiny_cnn_vq(),
        decoder=LlamaDecoderConfig(vocab_size=256, grid_h=8, grid_w=8, width=64, layers=2, heads=4, kv_heads=2,
                                   mlp_dim=128, norm_eps=1e-6, rope="1d", prompt_vocab=512, max_prompt_len=96,
                                   image_embed="aligned", embed_dim=8, head="mlp", head_dim_mlp=64),
        prompt=PromptConfig(vocab_size=512, max_len=96, pad_id=1, bos_id=0, boi_id=3),
    )


def _tiny_llamagen() -> ModelConfig:
    return ModelConfig(
        name="tiny-llamagen",
        vqgan=_tiny_cnn_vq(),
        decoder=LlamaDecoderConfig(vocab_size=256, grid_h=8, grid_w=8, width=64, layers=2, heads=4, kv_heads=4,
                                   mlp_dim=192, rope="2d", num_classes=10),
    )


PRESETS = {
    "parti-350m": lambda: _parti("parti-350m", 12, 12, 1024, 16),
    "parti-750m": lambda: _parti("parti-750m", 12, 36, 1024, 16),
    "parti-3b": lambda: _parti("parti-3b", 12, 36, 2048, 32),
    "parti-20b": lambda: _parti("parti-20b", 16, 64, 4096, 64),
    "vim-base": lambda: _vim("vim-base", 24, 1536, 16),
    "vim-large": lambda: _vim("vim-large", 36, 2048, 32),
    **{name: (lambda name=name: _tokenizer_only(name)) for name in VQGAN_PRESETS},
    "tiny-t2i": _tiny_t2i,
    "tiny-vim": _tiny_vim,
    "janus-pro-1b": lambda: _janus_pro("janus-pro-1b", 2048, 24, 16, 5632),
    "janus-pro-7b": lambda: _janus_pro("janus-pro-7b", 4096, 30, 32, 11008),
    **{f"llamagen-c2i-{k}": (lambda k=k, shape=shape: _llamagen_c2i(f"llamagen-c2i-{k}", *shape, 256))
       for k, shape in {"b": (12, 12, 768), "l": (24, 16, 1024), "xl": (36, 20, 1280), "xxl": (48, 24, 1536),
                        "3b": (24, 32, 3200)}.items()},
    "tiny-janus": _tiny_janus,
    "tiny-llamagen": _tiny_llamagen,
}
