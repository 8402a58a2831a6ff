"""The settings of training (`cdcl-train`, train.py) and prediction (`cdcl-predict`, predict.py),
each written once: its default, its range, its help and whether a resumed run may change it. The
command-line parsers, the `--config FILE` reader, the range checks and the resume check all read
these definitions.

A setting comes from its flag, else from the `--config` file, else from its default; an error names
it the way it was given (`--lr: ...` or `run/config.json: lr: ...`). The settings are never changed:
`resolve_training` returns what is derived from them (the model and inference configurations, the
loss switches of the method, the ramp length, the data folder's real path) as a new `TrainRun`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace

from cdcl_ops import available_backends

from . import baseline, cli, data, imagefiles, instances, losses, models, targets
from .evaluate import InferenceConfig

ALWAYS = object()  # Spec.before of a setting as old as the checkpoint format


@dataclass(frozen=True)
class Spec:
    """What a setting's field declares besides its type and default."""
    help: str = ""
    lo: float | None = None  # the range cli.number checks (lo excluded with lo_open)
    hi: float | None = None
    lo_open: bool = False
    choices: tuple | None = None
    resume_free: bool = False  # a resumed run may change it: where it writes, how it runs and how the
    # test is decoded and compared, never what it trains
    positional: bool = False  # also given as the command's positional arguments
    # the value every run had before the setting existed: a checkpoint without it is compared as if it
    # held this value
    before: object = ALWAYS
    metavar: tuple | None = None


def setting(default=MISSING, help="", **spec):
    """A settings field; without a default the setting is required."""
    return field(default=default, metadata={"spec": Spec(help=help, **spec)})


def spec_of(f) -> Spec:
    return f.metadata["spec"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_LIB = losses.CONTRAST_DEFAULTS
_FORMATS = ("auto", *data.READERS)  # before the class: its field `data` hides the module there
_INSTANCES_HELP = ("how the foreground becomes nuclei in the reports: watershed (--target binary: the model's "
                   "foreground split along its distance transform, chosen on validation splits; --target boundary: "
                   "its predicted interiors grown into the foreground) or components (4-connected components: "
                   "touching nuclei stay one)")
_TARGET_HELP = ("what the model learns from the label maps: binary (background / nucleus, the paper's) or boundary "
                "(background / nucleus interior / nucleus boundary, 1 pixel wide; nuclei are decoded from the "
                "predicted interiors, so touching nuclei stay apart)")
_OTSU_HELP = ("foreground side of Otsu's threshold in the classical baseline: minority (the side with fewer pixels, "
              "right for DSB2018), dark (the fair side on H&E tissue such as MoNuSeg, where nuclei and stroma are "
              "the darker majority) or bright")
# the two ways to give the data: the benchmark protocol's settings with their defaults (a labeled set,
# part of whose labels the run hides), or the user's own labeled and unlabeled images
BENCHMARK = {"data": "data/dsb2018_sample", "dataset": "dsb", "format": "auto", "labeled_fraction": "1/8",
             "max_images": None}
OWN = ("labeled", "unlabeled", "val", "test")
_LABELED_HELP = ("your labeled images, instead of the benchmark's --data: folders in the layout form "
                 "(<root>/images + <root>/labels), or folders, files or glob patterns of images whose label maps "
                 "<id>.png, .tif or .tiff lie in the labels folder beside the images' folder")
_CHANNEL_HELP = ("read this plane (0-based) of multi-plane images (a multi-channel or multi-page TIFF) as a grey "
                 "image; such a file is refused without it")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # the records a run's config.json and checkpoints hold beside the settings, derived from these
    # settings (and recomputed from them when a config.json is read back)
    DERIVED: typing.ClassVar[dict] = {"model": ("preset", "input_size", "target"),
                                      "inference": ("window", "overlap", "flips", "resize")}

    # the benchmark protocol (None: not given; resolve_training fills in BENCHMARK's defaults unless the
    # user's own images are given instead)
    data: str | None = setting(None, "dataset folder of the benchmark protocol (dsb: one folder, split 7:1:2; "
                               f"monuseg: a folder with train/ and test/) (default: {BENCHMARK['data']})")
    dataset: str | None = setting(None, f"(default: {BENCHMARK['dataset']})", choices=("dsb", "monuseg"))
    format: str | None = setting(None, f"on-disk format (default: {BENCHMARK['format']})", choices=_FORMATS)
    # changes the images trained on, so a resumed run keeps it (a checkpoint without it read none)
    channel: int | None = setting(None, _CHANNEL_HELP, lo=0)
    max_images: int | None = setting(None, "use a seeded subset of this many images", lo=1)
    # the user's own images, instead of the benchmark protocol
    labeled: tuple[str, ...] | None = setting(None, _LABELED_HELP, metavar="PATH", before=None)
    unlabeled: tuple[str, ...] | None = setting(None, "your images without labels (with --labeled): folders, image "
                                                "files or glob patterns", metavar="PATH", before=None)
    val: tuple[str, ...] | None = setting(None, "your validation images, with labels as --labeled's (default: a "
                                          "seeded 1/8 of the --labeled images, at least one, by --split-seed)",
                                          metavar="PATH", before=None)
    test: tuple[str, ...] | None = setting(None, "your test images, with labels as --labeled's, evaluated after "
                                           "training (without them the run ends after training)", metavar="PATH",
                                           resume_free=True)
    out: str = setting("runs/train", resume_free=True)
    method: str = setting("cdcl", choices=tuple(losses.METHODS))
    labeled_fraction: str | None = setting(None, "the benchmark's labeled part of the training images: 1/32, 1/16, "
                                           f"1/8, 1 or any fraction (default: {BENCHMARK['labeled_fraction']})")
    preset: str = setting("small", choices=tuple(sorted(models.PRESETS)))
    target: str = setting("binary", _TARGET_HELP, choices=targets.TARGETS, before="binary")
    input_size: int | None = setting(None, "side of the training crops, a multiple of 8 x --grid (default: the "
                                     "preset's)", lo=1)
    resize: bool = setting(False, "the paper's protocol: resize every image (MoNuSeg: every 250x250 tile) to "
                           "--input-size x --input-size for training and inference, instead of native-resolution "
                           "crops and tiled inference")
    scale_range: tuple[float, float] = setting((0.8, 1.25), "zoom range of the augmentation at native resolution "
                                               "(with --resize: the paper's 0.7 1.0 crop)", metavar=("LO", "HI"))
    window: int = setting(256, "inference window side at native resolution (multiple of 32)")
    overlap: int = setting(64, "overlap of neighbouring inference windows, in pixels")
    flips: bool = setting(True, "test-time augmentation: average the four flips of each window in the test "
                          "evaluation and predict.py (validation runs without, as it runs every epoch)")
    pretrained: str | None = setting(None, "local torchvision DenseNet state dict for the encoder")
    epochs: int = setting(80, lo=1)
    iters_per_epoch: int | None = setting(None, "(default: ceil(training images / --batch-size))", lo=1)
    batch_size: int = setting(8, "labeled images per step (all ranks together)", lo=1)
    unlabeled_batch_size: int = setting(8, "unlabeled images per step (all ranks)", lo=1)
    lr: float = setting(1e-4, lo=0, lo_open=True)
    poly_power: float = setting(0.9, lo=0)
    ema_alpha: float = setting(0.999, lo=0, hi=1)
    unsup_start_epoch: int = setting(6, "first epoch (1-based) of the unlabeled branch", lo=1)
    rampup_epochs: float | None = setting(None, "length T of the w_cons ramp (default: --epochs)", lo=0)
    w_contr: float = setting(0.1, lo=0)
    w_cons: float = setting(1.0, "final consistency weight", lo=0)
    cons_threshold: float = setting(0.95, "L_cons only on pixels whose teacher confidence (largest class "
                                    "probability) reaches this; 0: every pixel (the paper)", lo=0, hi=1, before=0.0)
    cons_target: str = setting("hard", "hard: cross-entropy against the teacher's argmax (the paper); soft: "
                               "squared error between the two softmax outputs", choices=("hard", "soft"),
                               before="hard")
    teacher_bn: str = setting("ema", "the teacher's BatchNorm: eval (running statistics copied from the "
                              "student at every EMA update: the paper), ema (running statistics averaged like "
                              "the weights) or train (statistics of its own weak batch)",
                              choices=("eval", "ema", "train"), before="eval")
    strong_photometric: bool = setting(True, "the strong view adds blur, colour jitter and grayscale to the "
                                       "weak view (--no-strong-photometric: the two views are equal)", before=True)
    bn_momentum: float = setting(0.1, "the student's BatchNorm running statistics move this far towards each "
                                 "batch's (0.1: PyTorch's default; smaller: averaged over more batches, so "
                                 "evaluation sees steadier statistics)", lo=1e-4, hi=1, before=0.1)
    strong_cutmix: bool = setting(False, "the strong view of each unlabeled crop takes a box from another "
                                  "crop of the batch, and its L_cons / L_contr targets (the teacher's outputs on "
                                  "the weak views) are mixed the same way (CutMix)", before=False)
    w_ent: float = setting(0.01, lo=0)
    w_dice: float = setting(0.0, "weight of a soft-Dice term added to L_sup (0: the paper's cross-entropy alone)",
                            lo=0)
    cons: bool | None = setting(None, "L_cons on/off (default: per method)")
    contr: bool | None = setting(None, "L_contr on/off (default: per method)")
    ent: bool | None = setting(None, "L_ent on/off (default: per method)")
    sampling: str = setting(_LIB["sampling"], choices=tuple(losses.CONTRAST_CHOICES["sampling"]))
    semantics: str = setting(_LIB["semantics"], choices=tuple(losses.CONTRAST_CHOICES["semantics"]))
    grid: int = setting(_LIB["grid"], lo=1)
    fdp: float = setting(_LIB["fdp"], lo=0, hi=1)
    bdp: float = setting(_LIB["bdp"], lo=0, hi=1)
    temperature: float = setting(_LIB["temperature"], lo=0, lo_open=True)
    memory: int = setting(_LIB["memory"], lo=1)
    loss_backend: str | None = setting(None)
    loss_compact: bool = setting(False, "CrossPatchInfoNCE(compact=True): drop inactive rows before the op "
                                 "(less work, one host synchronisation)")
    seed: int = setting(0, "initialisation, labeled subset, sampling and augmentation")
    split_seed: int = setting(0, "the train/val/test split (fixed across --seed); with --labeled and no --val, "
                              "the validation images held out")
    device: str = setting("auto", resume_free=True)
    autocast: str = setting("none", "bf16 autocast for the training forward passes (GPU runs of the paper preset)",
                            choices=("none", "bf16"))
    channels_last: bool = setting(False, "channels_last memory format for model and inputs")
    threads: int | None = setting(None, lo=1, resume_free=True)
    resume: str | None = setting(None, "checkpoint to continue from ('auto': OUT/last.pt if present)",
                                 resume_free=True)
    stop_after_epochs: int | None = setting(None, "leave after this many epochs of this invocation (the schedules "
                                            "still span --epochs)", lo=1, resume_free=True)
    val_every: int = setting(1, "validate (and update best.pt) every N epochs and after the last", lo=1)
    overlays: int = setting(8, "test images to draw overlays for", lo=0, resume_free=True)
    instances: str = setting("watershed", _INSTANCES_HELP, choices=instances.INSTANCES, resume_free=True)
    otsu_side: str = setting("minority", _OTSU_HELP, choices=baseline.SIDES, resume_free=True)
    no_test: bool = setting(False, "skip the final test evaluation", resume_free=True)
    no_progress: bool = setting(False, resume_free=True)


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    DERIVED: typing.ClassVar[dict] = {}

    checkpoint: str = setting()
    images: tuple[str, ...] = setting(help="images to segment, as positional arguments or after --images: folders "
                                      "of images, dataset folders, image files or glob patterns (quoted, e.g. "
                                      "'scans/*.tif')", positional=True, metavar="PATH")
    labels: str | None = setting(None, "folder of <id>.png / .tif ground-truth instance maps")
    out: str = setting()
    label_format: str = setting("png", "label images: uint16 PNG, or TIFF (uint16; uint32 above 65,535 nuclei, "
                                "which a PNG cannot hold)", choices=("png", "tif"))
    instances: str | None = setting(None, _INSTANCES_HELP + " (default: the checkpoint's run's, else watershed; "
                                    "the target is the checkpoint's)", choices=instances.INSTANCES)
    otsu_side: str | None = setting(None, _OTSU_HELP + " (default: the checkpoint's run's, else minority)",
                                    choices=baseline.SIDES)
    channel: int | None = setting(None, _CHANNEL_HELP, lo=0)
    save_probabilities: bool = setting(False, "also write the foreground probability to "
                                       "OUT/probabilities/<id>.tif")
    probability_dtype: str = setting("float16", "dtype of the probability TIFFs (uint8: 255 x p, rounded)",
                                     choices=imagefiles.PROBABILITY_DTYPES)
    threshold: float | None = setting(None, "foreground probability threshold (default: the checkpoint's, 0.5)")
    window: int | None = setting(None, "inference window side (multiple of 32) (default: the checkpoint's)")
    overlap: int | None = setting(None, "overlap of neighbouring windows, pixels (default: the checkpoint's)")
    batch: int = setting(8, "windows per forward pass")
    flips: bool | None = setting(None, "average the four flips of each window (default: as the checkpoint's run)")
    no_progress: bool = setting(False)
    device: str = setting("auto")


# ---------------------------------------------------------------- types

def _kind(tp) -> tuple[type, bool, int | None]:
    """(the scalar type, whether None is allowed, the length of a fixed tuple, `...` for a tuple of
    any length >= 1, or None)."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        (tp,) = [a for a in args if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return args[0], optional, ... if args[1:] == (...,) else len(args)
    return tp, optional, None


_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(value, base):
    """`value` as `base`, or None when it is not one (a bool is neither an int nor a float)."""
    if isinstance(value, bool):
        return value if base is bool else None
    if base is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, base) else None


def _from_json(value, tp, choices, label):
    base, optional, length = _kind(tp)
    if value is None and optional:
        return None
    if length is ...:  # one item may stand alone (a config file of the time --images took one path)
        items = value if isinstance(value, list) and value else [value]
        items = [_convert(v, base) for v in items]
        out = None if None in items else tuple(items)
        what = f"{_WHAT[base]} or a non-empty list of them"
    elif length is not None:
        items = [_convert(v, base) for v in value] if isinstance(value, list) and len(value) == length else [None]
        out = None if None in items else tuple(items)
        what = f"a list of {length} {_WHAT[base].removeprefix('a ').removeprefix('an ')}s"
    else:
        out, what = _convert(value, base), _WHAT[base]
    if out is None:
        raise ValueError(f"{label}: expected {what}{' or null' if optional else ''}, got {json.dumps(value)}")
    if choices is not None and out not in choices:
        raise ValueError(f"{label}: expected one of {', '.join(choices)}, got {json.dumps(value)}")
    return out


# ---------------------------------------------------------------- command line and file

class _Parser(argparse.ArgumentParser):
    """Errors in one line, as every other error of the commands (the usage is a --help away)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parser(cls, description=None) -> argparse.ArgumentParser:
    """The command line of `cls`: one flag per field. Flags not given stay absent from the parsed
    namespace (argparse.SUPPRESS), so a --config file can fill them."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        s, (base, _, length) = spec_of(f), _kind(hints[f.name])
        text = s.help
        if f.default is MISSING:
            text = f"{text} (required)".lstrip()
        elif not any(f.default is v for v in (None, False)):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            text = f"{text} (default: {shown})".lstrip()
        kw = {"dest": f.name, "help": text.replace("%", "%%") or None}
        if base is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kw.update(type=base, choices=s.choices, nargs="+" if length is ... else length, metavar=s.metavar)
        p.add_argument(flag(f.name), **kw)
        if s.positional:
            p.add_argument(_POSITIONAL + f.name, nargs="*", type=base, metavar=f.name.upper(),
                           help=f"the same as {flag(f.name)}")
    p.add_argument("--config", metavar="FILE", help="a JSON object of these settings, keyed by name (--max-images: "
                   "max_images); flags given here override it")
    return p


_POSITIONAL = "positional_"  # the namespace key of a setting's positional arguments


def read_file(cls, path) -> dict:
    """The settings in the JSON file `path`, checked for type and choices (ranges: resolve_training)."""
    cli.regular_file("--config", path)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(raw).__name__}")
    hints, known = typing.get_type_hints(cls), {f.name: f for f in fields(cls)}
    out = {}
    for key, value in raw.items():
        if key in cls.DERIVED:
            continue  # recomputed from the settings
        if key not in known:
            raise ValueError(f"{path}: {key}: unknown setting")
        out[key] = _from_json(value, hints[key], spec_of(known[key]).choices, f"{path}: {key}")
    return out


def parse(cls, argv=None, description=None):
    """(settings, names): the settings of `argv` over its --config file over the defaults, and for
    each setting the name an error gives it (its flag, or `FILE: key` when the file set it). Bad
    flags exit through argparse (status 2); a bad file raises ValueError."""
    p = parser(cls, description)
    given = vars(p.parse_args(argv))
    path = given.pop("config", None)
    for key in [k for k in given if k.startswith(_POSITIONAL)]:
        name, values = key.removeprefix(_POSITIONAL), given.pop(key)
        if values and name in given:
            p.error(f"{flag(name)}: give the {name} either as arguments or after {flag(name)}, not both")
        if values:
            given[name] = values
    values = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    names = {f.name: flag(f.name) for f in fields(cls)}
    if path is not None:
        from_file = read_file(cls, path)
        values.update(from_file)
        names.update({k: f"{path}: {k}" for k in from_file})
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    names.update({k: flag(k) for k in given})
    missing = [flag(f.name) for f in fields(cls) if f.name not in values]
    if missing:
        p.error("the following arguments are required: " + ", ".join(missing))
    return cls(**values), names


# ---------------------------------------------------------------- training: checks and derived values

@dataclass(frozen=True)
class TrainRun:
    """A training run: its settings with every default that depends on others filled in, and what is
    derived from them. `stored()` is what config.json and the checkpoints hold."""
    settings: TrainConfig
    model: models.ModelConfig
    inference: InferenceConfig
    names: dict = field(compare=False, repr=False)  # how errors name each setting (see parse)

    def stored(self) -> dict:
        d = {f.name: getattr(self.settings, f.name) for f in fields(self.settings)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # as JSON and checkpoints hold it
        d["model"] = models.asdict(self.model)
        d["inference"] = models.asdict(self.inference)
        return d


def renamed(e: ValueError, names) -> ValueError:
    """A field's error (`window: expected ...`) as the setting's (`--window: expected ...`)."""
    key, _, rest = str(e).partition(":")
    return ValueError(f"{names.get(key, flag(key))}:{rest}")


def check_ranges(s, names) -> None:
    """Every setting of `s` that declares a range is within it (ValueError naming it)."""
    hints = typing.get_type_hints(type(s))
    for f in fields(s):
        sp = spec_of(f)
        if sp.lo is not None or sp.hi is not None:
            cli.number(names[f.name], getattr(s, f.name), lo=sp.lo, hi=sp.hi, lo_open=sp.lo_open,
                       optional=_kind(hints[f.name])[1])


def resolve_training(s: TrainConfig, names) -> TrainRun:
    """Check every setting (ValueError naming it) and derive the run; nothing is read or written."""
    check_ranges(s, names)
    device = cli.device(names["device"], s.device)
    if s.loss_backend is not None and s.loss_backend not in available_backends(device):
        raise ValueError(f"{names['loss_backend']}: expected one of {available_backends(device)} on {device.type}, "
                         f"got {s.loss_backend!r}")
    cli.output_folder(names["out"], s.out)
    if s.pretrained is not None:
        cli.regular_file(names["pretrained"], s.pretrained)
    method = losses.METHODS[s.method]
    sources = _data_sources(s, names, method)
    switches = {}
    for name in ("cons", "contr", "ent"):
        v = getattr(s, name)
        if not method.semi and v:
            raise ValueError(f"{names[name]}: method {s.method} trains on labeled images only")
        switches[name] = getattr(method, name) if v is None else v
    size = s.input_size or models.PRESETS[s.preset].input_size
    if size % (8 * s.grid) or size % 32:
        raise ValueError(f"{names['input_size']}: expected a multiple of {math.lcm(8 * s.grid, 32)} (stride-8 "
                         f"features cut into a {s.grid}x{s.grid} grid, a stride-32 encoder), got {size}")
    model = models.model_config(s.preset, input_size=s.input_size, num_classes=targets.NUM_CLASSES[s.target])
    try:
        inference = InferenceConfig(window=s.window, overlap=s.overlap, flips=s.flips,
                                    resize=model.input_size if s.resize else None)
    except ValueError as e:  # its messages start with the field name, which is the setting's
        raise renamed(e, names) from None
    lo, hi = (float(v) for v in s.scale_range)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"{names['scale_range']}: expected 0 < LO <= HI, got {lo} {hi}")
    settings = replace(s, scale_range=(lo, hi), **switches, **sources,
                       rampup_epochs=float(s.epochs) if s.rampup_epochs is None else s.rampup_epochs)
    return TrainRun(settings, model, inference, dict(names))


def _data_sources(s: TrainConfig, names, method: losses.Method) -> dict:
    """The data settings of the run: the benchmark protocol's with their defaults filled in, or the
    user's own images; either way with real paths, so that a resumed run reads the same files from
    any working directory."""
    bench = [k for k in BENCHMARK if getattr(s, k) is not None]
    own = [k for k in OWN if getattr(s, k) is not None]
    if bench and own:
        raise ValueError(f"{names[bench[0]]} and {names[own[0]]}: choose the benchmark protocol "
                         f"({', '.join(map(flag, BENCHMARK))}) or your own images ({', '.join(map(flag, OWN))}), "
                         "not both")
    if not own:
        v = {k: default if getattr(s, k) is None else getattr(s, k) for k, default in BENCHMARK.items()}
        try:
            fraction = data.parse_fraction("1" if method.all_labeled else v["labeled_fraction"])
        except ValueError as e:  # its message starts with the parameter's name
            raise renamed(e, names) from None
        return {**v, "labeled_fraction": str(fraction), "data": os.path.realpath(v["data"])}
    if s.labeled is None:
        raise ValueError(f"{names[own[0]]}: expected your labeled images beside it ({names['labeled']})")
    if method.all_labeled:
        raise ValueError(f"{names['method']}: {s.method} trains on every benchmark image with its labels; with your "
                         "own images train suponly (the labeled ones alone) or a semi-supervised method")
    if method.semi and s.unlabeled is None:
        raise ValueError(f"{names['unlabeled']}: method {s.method} learns from unlabeled images too; name them "
                         "(folders, image files or glob patterns), or train --method suponly")
    return {k: None if getattr(s, k) is None else tuple(map(os.path.realpath, getattr(s, k))) for k in OWN}


def before_settings() -> dict[str, object]:
    """What a checkpoint written before a setting existed ran with, for each such setting."""
    return {f.name: spec_of(f).before for f in fields(TrainConfig) if spec_of(f).before is not ALWAYS}


def resume_checked() -> dict[str, str]:
    """The stored settings a resumed run must keep, each with the flags that set it."""
    out = {f.name: flag(f.name) for f in fields(TrainConfig) if not spec_of(f).resume_free}
    out.update({k: "/".join(map(flag, src)) for k, src in TrainConfig.DERIVED.items()})
    return out
