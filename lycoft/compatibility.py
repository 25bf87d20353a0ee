"""Which programs read an adapter file correctly: the compatibility matrix of docs/spec.md ("Who reads
what"), written as data.

A file is described by its flavour and a few facts (`FACTS`); for each consumer the first rule whose
flavour matches and whose conditions all hold gives the verdict. Multipliers are not in the file, so
strength != 1 is a note (`STRENGTH_NOTE`), not a verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

CONSUMERS = ("lycoft", "LyCORIS", "ComfyUI", "reForge", "A1111", "Forge", "Forge Classic", "kohya-oft", "PEFT")
CONSUMER_NAMES = {
    "lycoft": "lycoft (lycoft.load, tools/merge.py)",
    "LyCORIS": "LyCORIS loader (lycoris-lora 4.x)",
    "ComfyUI": "ComfyUI LoraLoader (0.30)",
    "reForge": "reForge (stock; reads files as ComfyUI does)",
    "A1111": "A1111 (>= 1.8, stock)",
    "Forge": "Forge (lllyasviel, stock)",
    "Forge Classic": "Forge Classic (stock)",
    "kohya-oft": "kohya sd-scripts networks.oft",
    "PEFT": "PEFT / diffusers PEFT loader",
}

OK = "ok"
WRONG = "wrong"
FAILS = "fails"
IGNORED = "ignored"
CONVERT = "convert"
VERDICT_TEXT = {
    OK: "reads it correctly",
    WRONG: "reads it WRONG",
    FAILS: "cannot load it",
    IGNORED: "ignores it",
    CONVERT: "needs a conversion",
}

FLAVOURS = ("lycoris-oft", "lycoris-boft", "kohya-legacy", "lycoris-2.0", "lycoft-input", "peft-oft", "peft-boft",
            "diff")
FACTS = {
    "no_alpha": "some modules have no .alpha tensor",
    "block_size_gt_block_num": "some oft modules have more rows per block than blocks",
    "partial_butterfly": "some boft modules of several stages are not full butterflies (stages < 1 + log2(blocks))",
    "one_stage_butterfly": "some boft modules have one stage of 2, 4, 8 ... blocks (what convert --ui-safe writes)",
    "rescale": "some modules carry a rescale",
    "comfy_clamp": "some alpha is below its ||Q||: ComfyUI clamps by alpha where LyCORIS clamps by alpha*out",
    "te_flat_names": "text-encoder keys lack text_model_ (written by LyCORIS under transformers 5)",
    "sd1_unet_names": "UNet keys use diffusers names (SD1.x/SD2.x convention)",
}

_UI_CONVERT = "tools/convert.py --to diff --base <model> writes full differences every UI reads"
RESCALED_OFT_FIX = ("tools/convert.py --to lycoris --ui-safe writes the same weights as one-stage butterflies, "
                    "whose rescale they apply (or --to diff --base <model>)")
UI_SAFE_LOSES = ("the LyCORIS loader (lycoris-lora) misreads or refuses those butterflies (it rebuilds full ones "
                 "only): keep the original file for LyCORIS")
_NO_OFT_LOADER = ("no OFT loader: the file is dropped (\"LoRA version mismatch\"); install extensions/sd-webui-lycoft, "
                  "or " + _UI_CONVERT)


@dataclass(frozen=True)
class Rule:
    flavours: tuple[str, ...]
    consumer: str
    verdict: str
    when: tuple[str, ...] = ()
    why: str = ""


_COMFY_RULES: tuple[Rule, ...] = (
    Rule(("lycoris-boft",), "ComfyUI", WRONG, ("no_alpha",), "boft layers without .alpha are silently left unchanged"),
    Rule(("lycoris-oft",), "ComfyUI", WRONG, ("rescale",), "rescale is ignored for oft; " + RESCALED_OFT_FIX),
    Rule(("lycoris-oft", "lycoris-boft"), "ComfyUI", WRONG, ("comfy_clamp",),
         "ComfyUI bounds ||Q|| by alpha instead of alpha*out; tools/convert.py --to lycoris bakes the constraint"),
    Rule(("lycoris-oft", "lycoris-boft"), "ComfyUI", WRONG, ("te_flat_names",),
         "text-encoder keys without text_model_ are not mapped; tools/convert.py --to lycoris renames them"),
    Rule(("lycoris-oft", "lycoris-boft"), "ComfyUI", OK, why="at strength 1 (oft: strength s acts as s^2)"),
    Rule(("diff",), "ComfyUI", OK),
    Rule(("kohya-legacy",), "ComfyUI", IGNORED, why="no oft_unet_ mapping; tools/convert.py --to lycoris renames it"),
    Rule(("lycoris-2.0",), "ComfyUI", IGNORED, why="oft_diag is not read; tools/convert.py --to lycoris converts it"),
    Rule(("lycoft-input", "peft-oft", "peft-boft"), "ComfyUI", IGNORED, why=_UI_CONVERT),
)

RULES: tuple[Rule, ...] = (
    # lycoft
    Rule(("lycoris-oft", "lycoris-boft", "kohya-legacy", "lycoris-2.0", "lycoft-input"), "lycoft", OK),
    Rule(("peft-oft",), "lycoft", CONVERT, why="tools/convert.py --to lycoris (or --to diff)"),
    Rule(("peft-boft",), "lycoft", CONVERT, why="tools/convert.py --to diff --base <model>"),
    Rule(("diff",), "lycoft", IGNORED, why="full differences: load them in a UI; merge the original adapter"),
    # LyCORIS loader (lycoris.kohya.create_network_from_weights)
    Rule(("lycoris-oft", "lycoris-boft"), "LyCORIS", FAILS, ("no_alpha",),
         "modules without .alpha crash its loader (float(None)); tools/convert.py --to lycoris adds it"),
    Rule(("lycoris-oft",), "LyCORIS", FAILS, ("block_size_gt_block_num",),
         "it rebuilds oft layers with block_size <= block_num only"),
    Rule(("lycoris-boft",), "LyCORIS", FAILS, ("partial_butterfly",),
         "it rebuilds full butterflies (stages = 1 + log2(blocks)) only; of a --ui-safe file, load the original"),
    Rule(("lycoris-boft",), "LyCORIS", WRONG, ("one_stage_butterfly",),
         "it rebuilds a full butterfly and copies the one stage into every stage, silently; of a --ui-safe file, "
         "load the original"),
    Rule(("lycoris-oft", "lycoris-boft"), "LyCORIS", OK,
         why="its CLIP-L text-encoder names depend on transformers: text_model_ keys match under transformers 4"),
    Rule(("diff",), "LyCORIS", OK, why="loaded as its 'full' algorithm"),
    Rule(("kohya-legacy",), "LyCORIS", IGNORED, why="the oft_unet_ prefix is not read; --to lycoris renames it"),
    Rule(("lycoris-2.0",), "LyCORIS", IGNORED, why="oft_diag is not read any more; --to lycoris converts it"),
    Rule(("lycoft-input", "peft-oft", "peft-boft"), "LyCORIS", IGNORED, why=_UI_CONVERT),
    # ComfyUI (comfy/weight_adapter oft.py / boft.py) and reForge (the same adapters in ldm_patched)
    *_COMFY_RULES,
    *(replace(rule, consumer="reForge") for rule in _COMFY_RULES),
    # A1111 (extensions-builtin/Lora/network_oft.py after PR #14973)
    Rule(("lycoris-oft", "lycoris-boft"), "A1111", WRONG, ("te_flat_names",),
         "text-encoder keys without text_model_ are not mapped; tools/convert.py --to lycoris renames them"),
    Rule(("lycoris-oft",), "A1111", OK, ("rescale",), "at multiplier 1 (with rescale, m != 1 differs)"),
    Rule(("lycoris-oft",), "A1111", OK),
    Rule(("lycoris-boft",), "A1111", OK,
         why="at multiplier 1 (m != 1: one global interpolation); A1111 before 1.8 has no boft: " + _UI_CONVERT),
    Rule(("lycoris-2.0",), "A1111", OK),
    Rule(("kohya-legacy",), "A1111", IGNORED, ("sd1_unet_names",),
         "SD1 oft_unet_ keys match no layer and are silently dropped; tools/convert.py --to lycoris renames them"),
    Rule(("kohya-legacy",), "A1111", OK),
    Rule(("diff",), "A1111", OK),
    Rule(("lycoft-input", "peft-oft", "peft-boft"), "A1111", IGNORED, why=_UI_CONVERT),
    # Forge (lllyasviel) and Forge Classic: no OFT code (backend/patcher/lora.py)
    Rule(("diff",), "Forge", OK),
    Rule(FLAVOURS, "Forge", IGNORED, why=_NO_OFT_LOADER),
    Rule(("diff",), "Forge Classic", OK),
    Rule(FLAVOURS, "Forge Classic", IGNORED, why=_NO_OFT_LOADER),
    # kohya sd-scripts networks/oft.py
    Rule(("kohya-legacy",), "kohya-oft", OK),
    Rule(FLAVOURS, "kohya-oft", IGNORED, why="it reads only its own oft_unet_ keys"),
    # PEFT
    Rule(("peft-oft", "peft-boft"), "PEFT", OK, why="with its adapter config"),
    Rule(("lycoft-input",), "PEFT", CONVERT, why="tools/convert.py --to peft"),
    Rule(FLAVOURS, "PEFT", IGNORED, why="PEFT reads only its own layout (input side)"),
)

STRENGTH_NOTE = (
    "strength != 1 is read differently by each program (LyCORIS/lycoft: (m(R-I)+I)^T W, boft per stage; "
    "ComfyUI and reForge: s^2 for oft, an extra s for boft; A1111: W + m(W'-W)); bake a strength with tools/merge.py "
    "--adapter file:m or tools/convert.py --to diff --multiplier m"
)


@dataclass(frozen=True)
class Verdict:
    consumer: str
    verdict: str
    why: str

    def text(self) -> str:
        s = VERDICT_TEXT[self.verdict]
        return f"{s}: {self.why}" if self.why else s


def verdicts(flavour: str, facts: Iterable[str], rules: Iterable[Rule] = RULES) -> list[Verdict]:
    """The verdict of each consumer on a file of `flavour` with the given facts (first matching rule)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
    facts = set(facts)
    unknown = facts - set(FACTS)
    if unknown:
        raise ValueError(f"unknown facts {sorted(unknown)}")
    rules = list(rules)
    out = []
    for consumer in CONSUMERS:
        for rule in rules:
            if rule.consumer == consumer and flavour in rule.flavours and set(rule.when) <= facts:
                out.append(Verdict(consumer, rule.verdict, rule.why))
                break
        else:
            out.append(Verdict(consumer, IGNORED, "not one of its formats"))
    return out


def verdict_table(flavour: str, facts: Iterable[str]) -> Mapping[str, Verdict]:
    return {v.consumer: v for v in verdicts(flavour, facts)}


def rescaled_oft_misreaders() -> list[str]:
    """The consumers that read an oft file with rescale wrong at strength 1 (per `RULES`)."""
    return [v.consumer for v in verdicts("lycoris-oft", ["rescale"]) if v.verdict == WRONG]


def rescaled_oft_advice(path: str) -> str:
    """One line on an oft file with rescale at `path` (save-time warning, tools/inspect.py): who misreads it
    and the command that writes a copy they read right."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return (f"{path} has oft layers with rescale, which stock {' and '.join(rescaled_oft_misreaders())} ignore "
            f"(their images come out wrong); for them write the same weights in a layout they read right: python "
            f"tools/convert.py --in {path} --out {stem}-ui.safetensors --to lycoris --ui-safe")
