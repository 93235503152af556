"""Tensor roles, and the precision of each role as a recipe or the command line asks.

A recipe's "weights" is either one format for every matrix ("fp32") or one per role:

    {"embedding": "int8", "attention": "int8", "mlp": "int8", "router": "fp32", "experts": "int4",
     "group_size": 64, "sym": true, "ratio": 1.0}

`group_size` -1 is int4 per output channel (what NPUs prefer); `ratio` is optimum-cli's: the share of the int4
roles' parameters stored int4, the rest (the tensors int4 would hurt most, see sensitivity.py) at int8.

The vision tower's matrices (role "vision") stay fp32 unless "vision" names fp16 or int8: an image's features pass
through the whole tower once and are then read by every step, so its error is paid everywhere (the quality report
measures it); int4 is refused.

Norms, scalars and the router's per-expert scales are vectors and always stay fp32.
"""

from dg_runtime.errors import UserError

from .schemes import FLOAT_FORMATS, FORMATS, Scheme

ROLES = ("embedding", "attention", "mlp", "router", "experts")
VISION_FORMATS = ("fp32", "fp16", "int8")
DEFAULT_GROUP = 128  # optimum-cli's; narrowed per tensor where the width needs it (the expert width 704 takes 64)


def role_of(source: str) -> str:
    """The role of a checkpoint matrix, from its name."""
    if "vision_tower" in source or "embed_vision" in source:
        return "vision"  # not one of ROLES: fp32 unless asked (Precision.vision)
    if "embed_tokens" in source or source == "lm_head.weight":
        return "embedding"
    if ".self_attn." in source:
        return "attention"
    if ".experts." in source:
        return "experts"
    if ".router." in source:
        return "router"
    return "mlp"  # the dense MLP and the self-conditioning MLP


def weight_formats(format_: str) -> dict:
    """What --weight-format means per role: int4 keeps the embedding at 8 bits (it is also the LM head) and the
    router at full precision, as optimum-intel's int4 export keeps its most sensitive tensors wider."""
    if format_ in FLOAT_FORMATS:
        return {role: format_ for role in ROLES}
    if format_ == "int8":
        return {**{role: "int8" for role in ROLES}, "router": "fp32"}
    return {"embedding": "int8", "attention": "int4", "mlp": "int4", "router": "fp32", "experts": "int4"}


class Precision:
    """The scheme of every role, from a recipe's "weights" entry with command-line overrides applied."""

    def __init__(self, weights, weight_format: str | None = None, group_size: int | None = None,
                 sym: bool | None = None, ratio: float | None = None, vision: str | None = None,
                 where: str = "recipe"):
        spec = dict(weights) if isinstance(weights, dict) else {role: weights for role in ROLES}
        if weight_format is not None:
            spec.update(weight_formats(weight_format))
        group, symmetric = spec.pop("group_size", DEFAULT_GROUP), spec.pop("sym", False)
        share, tower = spec.pop("ratio", 1.0), spec.pop("vision", "fp32")
        tower = vision if vision is not None else tower
        group = group_size if group_size is not None else group
        symmetric = sym if sym is not None else symmetric
        share = ratio if ratio is not None else share
        if set(spec) != set(ROLES):
            raise UserError(f"{where} weights must name a format for each of {', '.join(ROLES)} (got {sorted(spec)})")
        for role, value in spec.items():
            if value not in FORMATS:
                raise UserError(f"{where} asks for {value!r} {role} weights; choose one of {', '.join(FORMATS)}")
        if spec["router"] not in FLOAT_FORMATS:
            raise UserError("the router picks the experts and is tiny: keep it at fp32 or fp16")
        if spec["embedding"] == "int4":
            raise UserError("the embedding is also the LM head (4-bit logits cost the sampler steps): keep it at int8 "
                            "or wider")
        if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and (group < 16 or group & (group - 1))):
            raise UserError(f"--group-size must be a power of two of at least 16, or -1 for one group a row (got "
                            f"{group!r})")
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
            raise UserError(f"--ratio is the share of the int4 weights kept int4, from 0 to 1 (got {share!r})")
        if tower not in VISION_FORMATS:
            raise UserError(f"{where} asks for {tower!r} vision tower weights; choose one of {', '.join(VISION_FORMATS)}"
                            " (int4 is not offered: the tower's error reaches every step)")
        self.formats, self.group, self.sym, self.ratio = spec, group, bool(symmetric), float(share)
        self.vision = tower
        self.backup: set[str] = set()  # the tensors --ratio keeps at int8 (see sensitivity.backup_tensors)

    def scheme(self, source: str, shape: tuple) -> Scheme:
        """How a tensor of this name and shape is stored: vectors in fp32, matrices as their role says."""
        format_ = self.format_of(role_of(source), shape) if len(shape) > 1 else "fp32"
        if format_ == "int4" and source in self.backup:
            return Scheme("int8")
        if format_ != "int4":
            return Scheme(format_)
        return Scheme("int4", self.group, self.sym).for_columns(shape[-1])

    def format_of(self, role: str, shape: tuple = (0, 0)) -> str:
        """The format of a matrix of this role; the tower's position table ([2, positions, hidden], looked up, not
        multiplied) stays fp32."""
        if role == "vision":
            return self.vision if len(shape) == 2 else "fp32"
        return self.formats[role]

    @property
    def quantized(self) -> bool:
        return any(f not in FLOAT_FORMATS for f in (*self.formats.values(), self.vision))

    def summary(self) -> dict:
        """For the manifest: the format of each role (the tower's when not fp32), and the int4 settings when int4
        is used."""
        entry = {**self.formats, **({"vision": self.vision} if self.vision != "fp32" else {})}
        if "int4" in self.formats.values():
            entry.update(group_size=self.group, sym=self.sym, ratio=self.ratio)
        return entry

    def label(self) -> str:
        """A short name: 'fp32', or 'int4 experts (group 64, sym), int8 embedding/attention/mlp, fp32 router'."""
        by_format: dict[str, list] = {}
        for role, format_ in self.summary().items():
            if role not in (*ROLES, "vision"):
                continue
            by_format.setdefault(format_, []).append(role)
        settings = ["per channel" if self.group == -1 else f"group {self.group}", "sym" if self.sym else "asym"]
        if self.ratio < 1:
            settings.append(f"ratio {self.ratio:g}")
        named = {f: f"{f} ({', '.join(settings)})" if f == "int4" else f for f in by_format}
        if len(by_format) == 1:
            return named[next(iter(by_format))]
        return ", ".join(f"{named[f]} {'/'.join(roles)}" for f, roles in by_format.items())
