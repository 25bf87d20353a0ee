"""The one schema of adapter options.

`AdapterConfig` is what one OFT/BOFT adapter looks like; `NetworkOptions` adds which layers get one
(preset, include/exclude, conv block size, per-module overrides). `OPTIONS` is the ``key=value``
vocabulary with every LyCORIS and kohya spelling; `parse_network_args` is its one parser (used by
``train_network.py`` and ``--network_module lycoft.kohya`` alike) and `NetworkOptions.to_args` its one
writer (file metadata, the saved training TOML).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError, did_you_mean

ALGO_ALIASES = {"oft": "oft", "diag-oft": "oft", "diag_oft": "oft", "boft": "boft", "butterfly": "boft"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _two_adic(n: int) -> int:
    """Largest e with 2**e dividing n (n > 0)."""
    e = 0
    while n % 2 == 0:
        n //= 2
        e += 1
    return e


@dataclass(frozen=True)
class BlockLayout:
    """The resolved shape of one adapter on a layer with `dim` rotated channels.

    oft: `stages == 1` and the tensor is `(block_num, block_size, block_size)`;
    boft: the tensor is `(stages, block_num, block_size, block_size)`.
    """

    algo: str
    dim: int
    block_size: int
    block_num: int
    stages: int

    @property
    def shape(self) -> tuple[int, ...]:
        b, nb = self.block_size, self.block_num
        return (nb, b, b) if self.algo == "oft" else (self.stages, nb, b, b)


@dataclass(frozen=True)
class AdapterConfig:
    """How to build an orthogonal adapter for one layer (or, as a network default, for every layer).

    Fields:
        algo: ``"oft"`` (block-diagonal rotation, the LyCORIS ``diag-oft``) or ``"boft"`` (butterfly:
            a product of ``butterfly_factors`` sparse rotations; more expressive per parameter, costlier).
        block_size: rows per rotation block. Bigger blocks rotate more channels together: more
            expressive, more parameters (``dim * block_size``), more compute. Must divide the layer's
            rotated dimension. Give ``block_size`` or ``block_num``, not both (default: block_size 32 for
            oft, 8 for boft).
        block_num: number of blocks instead of their size (kohya ``networks.oft`` counts blocks).
        butterfly_factors: boft only: number of butterfly stages ``m``; ``2**(m-1)`` must divide the
            block count. ``None`` takes the largest valid ``m`` (the full butterfly when the block count is
            a power of two). Each stage costs as much as one oft rotation.
        constraint: COFT bound on ``||Q||_F <= constraint * dim`` over the whole adapter; 0 disables it.
            Small values (1e-4 .. 1e-2) keep the model close to the base: less drift, slower learning.
        rescale: also train a per-output-channel scale (init 1). Breaks norm preservation; ComfyUI
            ignores it for oft files (export a ``.diff`` for those users).
        side: ``"output"`` rotates output channels (LyCORIS/ComfyUI/A1111 convention, the default and
            the only side those UIs read); ``"input"`` rotates the input dimension (the paper/PEFT form).
        dropout: module dropout during training: each block is replaced by the identity with this
            probability (multiplicative, so the adapter stays orthogonal).
        neumann_terms: 0 = exact Cayley (default). ``n > 0`` uses a truncated Neumann series of ``n``
            terms for ``(I - Q)^-1``: an approximation, faster on some GPUs, NOT orthogonal at large Q.
        path: execution path of the forward: ``"auto"`` picks the cheaper exact path per call;
            ``"weight"`` rebuilds the rotated weight; ``"activation"`` rotates the layer's output.
    """

    algo: str = "oft"
    block_size: int | None = None
    block_num: int | None = None
    butterfly_factors: int | None = None
    constraint: float = 0.0
    rescale: bool = False
    side: Literal["output", "input"] = "output"
    dropout: float = 0.0
    neumann_terms: int = 0
    path: Literal["auto", "weight", "activation"] = "auto"

    def __post_init__(self) -> None:
        algo = ALGO_ALIASES.get(str(self.algo).lower())
        if algo is None:
            raise ValueError(f"algo {self.algo!r} is not known; use 'oft' (alias 'diag-oft') or 'boft'")
        object.__setattr__(self, "algo", algo)
        if self.block_size is not None and self.block_num is not None:
            raise ValueError(
                f"give block_size ({self.block_size}) or block_num ({self.block_num}), not both"
            )
        for name in ("block_size", "block_num", "butterfly_factors"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.algo == "oft" and self.butterfly_factors not in (None, 1):
            raise ValueError(
                f"butterfly_factors={self.butterfly_factors} only applies to algo='boft'; drop it or use boft"
            )
        if self.algo == "boft" and self.block_size is not None and self.block_size % 2:
            raise ValueError(f"boft needs an even block_size, got {self.block_size}; use e.g. 8 or 16")
        if not (self.constraint >= 0):
            raise ValueError(f"constraint must be >= 0 (0 disables it), got {self.constraint!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {self.side!r}")
        if self.path not in ("auto", "weight", "activation"):
            raise ValueError(f"path must be 'auto', 'weight' or 'activation', got {self.path!r}")
        if self.neumann_terms < 0:
            raise ValueError(f"neumann_terms must be >= 0 (0 = exact Cayley), got {self.neumann_terms}")

    def replace(self, **changes: Any) -> AdapterConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def layout(self, dim: int, where: str = "layer") -> BlockLayout:
        """Resolve block size, count and stages for `dim` rotated channels, or raise with the fix."""
        default_b = 32 if self.algo == "oft" else 8
        if self.block_num is not None:
            if dim % self.block_num:
                ok = [d for d in _divisors(dim) if d <= 512][-8:]
                raise ValueError(
                    f"block_num {self.block_num} does not divide {dim} channels of {where}; use one of {ok}"
                )
            b, nb = dim // self.block_num, self.block_num
        else:
            b = self.block_size or default_b
            if dim % b:
                ok = [d for d in _divisors(dim) if d <= 128 and (self.algo == "oft" or d % 2 == 0)][-6:]
                raise ValueError(
                    f"block_size {b} does not divide {dim} channels of {where}; use one of {ok}"
                )
            nb = dim // b
        if self.algo == "oft":
            return BlockLayout("oft", dim, b, nb, 1)
        if b % 2:
            raise ValueError(f"boft needs an even block size, got {b} on {where} ({dim} channels)")
        max_m = 1 + _two_adic(nb)
        m = self.butterfly_factors or max_m
        if m > max_m:
            raise ValueError(
                f"butterfly_factors {m} is impossible on {where}: {dim} channels in {nb} blocks of {b}, "
                f"and 2**(m-1) must divide {nb}; use butterfly_factors <= {max_m}"
            )
        return BlockLayout("boft", dim, b, nb, m)


# --------------------------------------------------------------------------------------------------
# The key=value vocabulary


@dataclass(frozen=True)
class Option:
    """One ``key=value`` adapter option.

    key: the canonical spelling (what the writer writes). kind: ``str``, ``int``, ``float``, ``bool`` or
    ``json`` (a JSON object). aliases: other spellings LyCORIS or kohya use. target: the `AdapterConfig`
    field it sets, or ``None`` for a `NetworkOptions` field of the same name. ignored: why a key that
    LyCORIS or kohya know has no effect on rotations (accepted, and reported when set).
    """

    key: str
    kind: str
    help: str
    aliases: tuple[str, ...] = ()
    target: str | None = None
    ignored: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("algo", "str", "`oft` (alias `diag-oft`) or `boft`", target="algo"),
    Option("block_size", "int", "rows per rotation block; beats `network_dim` (the same key in kohya's spelling)",
           ("dim",), target="block_size"),
    Option("block_num", "int", "number of blocks per layer instead of their size; beats `network_dim`",
           target="block_num"),
    Option("butterfly_factors", "int", "BOFT stages m; default the largest valid (full butterfly)", ("boft_m",),
           target="butterfly_factors"),
    Option("constraint", "float", "COFT bound `||Q|| <= constraint * channels`; 0 = off", ("constrain",),
           target="constraint"),
    Option("rescale", "bool", "`true` also trains a per-channel scale", ("rescaled",), target="rescale"),
    Option("module_dropout", "float", "probability of replacing a block by the identity while training",
           target="dropout"),
    Option("side", "str", "`output` (default, what UIs read) or `input` (paper/PEFT form, saved in PEFT layout)",
           target="side"),
    Option("path", "str", "`auto` (default), `weight` or `activation`: the forward's execution path",
           target="path"),
    Option("neumann_terms", "int", "0 = exact Cayley (default); n > 0 = n-term Neumann approximation",
           ("num_cayley_neumann_terms",), target="neumann_terms"),
    Option("preset", "str", "`full` (default), `attn-mlp`, `attn-only`, `full-lin`, `unet-only`"),
    Option("include", "str", "regex on module path or key: adapt the matching layers too"),
    Option("exclude", "str", "regex on module path or key: leave the matching layers out"),
    Option("conv_block_size", "int", "block size for convolutions with kernel > 1", ("conv_dim",)),
    Option("overrides", "json", 'JSON object regex -> options for the matching layers, e.g. '
           '`{"conv":{"block_size":16}}`'),
    Option("dropout", "float", "kohya's neuron dropout (`--network_dropout`)", ("network_dropout",),
           ignored="neuron dropout has no meaning for a rotation; use module_dropout=<p> to drop whole blocks"),
    Option("rank_dropout", "float", "LyCORIS rank dropout", ignored="OFT/BOFT have no rank"),
    Option("conv_alpha", "float", "LyCORIS conv alpha", ignored="OFT/BOFT have no alpha; use constraint="),
    Option("use_tucker", "bool", "LyCORIS Tucker decomposition", ignored="OFT/BOFT have no decomposition"),
    Option("use_scalar", "bool", "LyCORIS trainable scalar", ignored="OFT/BOFT have no scalar"),
    Option("train_norm", "bool", "LyCORIS norm-layer training", ignored="lycoft adapts linear and conv layers only"),
)

OPTION_BY_NAME: dict[str, Option] = {o.key: o for o in OPTIONS} | {a: o for o in OPTIONS for a in o.aliases}
_NETWORK_FIELDS = ("preset", "include", "exclude", "conv_block_size", "overrides")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_UNSET = ("", "none")
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "json": 'a JSON object such as {"conv": {"block_size": 16}}'}


def _typed(option: Option, value: Any, where: str) -> Any:
    """A value (kohya passes strings, TOML and Python pass typed values) in the option's type; ``None``
    for an unset spelling (``""``/``"none"``) of a number."""
    kind = option.kind
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.lower() in _UNSET and kind != "str":
        return None
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(text) if text is not None else value
            if int(number) != number:
                raise ValueError
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(text if text is not None else value)
        if kind == "json":
            parsed = json.loads(text) if text is not None else value
            if not isinstance(parsed, Mapping) or not all(isinstance(v, Mapping) for v in parsed.values()):
                raise ValueError
            return {str(k): dict(v) for k, v in parsed.items()}
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {_EXPECTED[kind]}, got {value!r}") from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@dataclass(frozen=True)
class NetworkOptions:
    """Every adapter option of a network: the `AdapterConfig` of its layers plus which layers get one.

    Build it with `parse_network_args` (from ``key=value`` items) or directly. ``given`` keeps the keys
    that were set, in canonical spelling and order (what `to_args` writes); ``notes`` says which of them
    have no effect (kohya/LyCORIS keys that do not apply to rotations), for the caller to report once.
    """

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    preset: str = "full"
    include: str | None = None
    exclude: str | None = None
    conv_block_size: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    given: tuple[tuple[str, Any], ...] = ()
    notes: tuple[str, ...] = ()

    @classmethod
    def describe(cls, adapter: AdapterConfig, preset: str = "full", include: str | None = None,
                 exclude: str | None = None, conv_block_size: int | None = None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> NetworkOptions:
        """The options of settings made in Python: ``given`` holds each setting that differs from its default
        (what `to_args` then writes)."""
        default = AdapterConfig()
        network = {"preset": preset, "include": include, "exclude": exclude, "conv_block_size": conv_block_size,
                   "overrides": dict(overrides) if overrides else None}
        given = []
        for option in OPTIONS:
            if option.ignored:
                continue
            if option.target:
                value, unset = getattr(adapter, option.target), getattr(default, option.target)
            else:
                value, unset = network[option.key], ("full" if option.key == "preset" else None)
            if value != unset:
                given.append((option.key, value))
        return cls(adapter=adapter, given=tuple(given), **network)

    def inject_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `lycoft.inject` these options stand for."""
        return {"config": self.adapter, "preset": self.preset, "include": self.include, "exclude": self.exclude,
                "overrides": self.overrides, "conv_block_size": self.conv_block_size}

    def to_dict(self) -> dict[str, Any]:
        """The options that were set, canonical key -> typed value."""
        return dict(self.given)

    def to_strings(self) -> dict[str, str]:
        """The options that were set, canonical key -> value as text (what file metadata stores)."""
        return {k: _text(v) for k, v in self.given}

    def to_args(self) -> list[str]:
        """The options that were set as canonical ``key=value`` strings (`parse_network_args` reads them
        back to equal options)."""
        return [f"{k}={v}" for k, v in self.to_strings().items()]


def _items(items: Iterable[str] | Mapping[str, Any] | None, source: str) -> list[tuple[str, Any, str]]:
    """(spelling, value, where) of each item; ``where`` names the source for error messages."""
    if items is None:
        return []
    if isinstance(items, Mapping):
        return [(str(k).strip(), v, f"{source} {k}") for k, v in items.items()]
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} item {item!r} is not key=value; write e.g. 'block_size=16'")
        out.append((key.strip(), value.strip(), f"{source} {key.strip()}"))
    return out


def parse_network_args(
    items: Iterable[str] | Mapping[str, Any] | None,
    *,
    network_dim: int | None = None,
    network_dropout: float | None = None,
    source: str = "network_args",
    dim_source: str = "--network_dim",
    dropout_source: str = "--network_dropout",
) -> NetworkOptions:
    """``key=value`` items (or a mapping) plus kohya's ``network_dim`` and ``network_dropout`` ->
    `NetworkOptions`, with the same meaning wherever they come from.

    ``network_dim`` is the block size; a ``block_size`` or ``block_num`` item beats it (kohya front ends
    always pass a dim; the override is noted). ``network_dropout`` is kohya's neuron dropout, the key
    ``dropout``. Any other key given twice with different values (under any spelling) is an error naming
    both sources. Every problem raises `ConfigError` (a `ValueError`) naming the key and the fix.
    """
    # canonical key -> (typed value, how the user wrote it: "network_args constrain=0.01", "--network_dim 8")
    seen: dict[str, tuple[Any, str]] = {}

    def put(option: Option, value: Any, shown: str) -> None:
        if value is None:
            return
        if option.key in seen and seen[option.key][0] != value:
            raise ConfigError(f"{option.key} is given twice with different values: {seen[option.key][1]} and "
                              f"{shown}; keep one")
        seen.setdefault(option.key, (value, shown))

    for spelling, value, where in _items(items, source):
        option = OPTION_BY_NAME.get(spelling)
        if option is None:
            raise ConfigError(
                f"unknown {source} key {spelling!r}{did_you_mean(spelling, OPTION_BY_NAME)} "
                f"(known: {', '.join(o.key for o in OPTIONS)})")
        put(option, _typed(option, value, where), f"{where}={_text(value)}")
    notes: list[str] = []
    if network_dim is not None:
        block_size = OPTION_BY_NAME["block_size"]
        dim = _typed(block_size, network_dim, dim_source)
        given = seen.get("block_num") or seen.get("block_size")
        if given is None:
            put(block_size, dim, f"{dim_source} {network_dim}")
        elif given[0] != dim:
            notes.append(f"{given[1]} is used; {dim_source} {network_dim} (the block size) is not")
    if network_dropout is not None:
        dropout = OPTION_BY_NAME["dropout"]
        put(dropout, _typed(dropout, network_dropout, dropout_source), f"{dropout_source} {network_dropout}")
    return _build(seen, source, notes)


def _build(seen: Mapping[str, tuple[Any, str]], source: str, notes: list[str]) -> NetworkOptions:
    adapter: dict[str, Any] = {}
    network: dict[str, Any] = {}
    for key, (value, shown) in seen.items():
        option = OPTION_BY_NAME[key]
        if option.ignored:
            if value not in (0, 0.0, False, ""):
                notes.append(f"{shown} is ignored: {option.ignored}")
        elif option.target:
            adapter[option.target] = value
        else:
            network[key] = value
    try:
        config = AdapterConfig(**adapter)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    overrides = network.get("overrides")
    if overrides:
        overrides = {regex: _override(regex, fields_, source) for regex, fields_ in overrides.items()}
    if network.get("conv_block_size") is not None and network["conv_block_size"] < 1:
        raise ConfigError(f"{source} conv_block_size must be >= 1, got {network['conv_block_size']}")
    return NetworkOptions(
        adapter=config,
        preset=network.get("preset") or "full",
        include=network.get("include") or None,
        exclude=network.get("exclude") or None,
        conv_block_size=network.get("conv_block_size"),
        overrides=overrides or None,
        given=tuple((k, v) for k, (v, _) in seen.items()),
        notes=tuple(notes),
    )


def _override(regex: str, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One entry of ``overrides``: option spellings -> `AdapterConfig` field values."""
    out: dict[str, Any] = {}
    for spelling, value in values.items():
        option = OPTION_BY_NAME.get(spelling)
        if option is None or option.target is None:
            settable = ", ".join(o.key for o in OPTIONS if o.target)
            raise ConfigError(f"{source} overrides[{regex!r}] key {spelling!r} cannot be set per layer; "
                              f"use one of {settable}")
        out[option.target] = _typed(option, value, f"{source} overrides[{regex!r}] {spelling}")
    return out
