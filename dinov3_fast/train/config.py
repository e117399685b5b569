"""The trainer's configuration: one small typed dataclass per component, in DINOv3's vocabulary.

Section and key names are DINOv3's (`ssl_default_config.yaml`: student, teacher, dino, ibot,
gram, optim, crops, train, compute_precision, checkpointing), so a DINOv3 YAML file loads with
the keys we implement; unknown keys raise (a typo is an error, not a silent default). DINOv3's
keys for features we do not have (fp8, distillation, pretrained weights, ...) load at the value
that leaves the feature off, its default, and raise at any other (`_DINOV3_OFF`), so DINOv3's own
ViT-L recipe (configs/train/vitl_im1k_lin834.yaml) loads; its 7B files use its v2 `schedules:`
section, which the `vit7b16` preset translates. Keys that DINOv3 does not have are marked "ours".
`validate` names any value out of its range before anything is built.

    cfg = get_preset("vitl16_h100")                      # a named preset
    cfg = load_config("run.yaml", base="debug")         # a YAML file over a preset
    cfg = apply_overrides(cfg, ["optim.lr=1e-3", "train.ac=full"])

Presets are named for what they run: `debug` (a two-block ViT at 32/16 px, seconds on a CPU),
`cpu` (ViT-S at 64/32 px, minutes on a CPU), `vitl16_h100` (DINOv3's ViT-L recipe on one H100),
`vit7b16` (the 7B recipe, for the memory planner and many GPUs).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AC_MODES = ("none", "full", "selective")
OPS_MODES = ("fused", "reference")
DTYPES = ("fp32", "bf16")  # no fp16: it needs loss scaling, which the loop does not do (see validate)



class ConfigError(ValueError):
    """A setting the trainer cannot run, or a missing input it names; `dinov3-fast train` reports
    it in one line (exit code 2) where any other error keeps its traceback."""

@dataclass
class StudentConfig:
    """DINOv3 `student:`: the backbone (teacher and Gram teacher share it, without drop path)."""
    arch: str = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float | None = 1.0e-5
    ffn_layer: str = "mlp"
    ffn_ratio: float | None = None  # None: the arch's
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_layer: str = "layernorm"
    n_storage_tokens: int = 0
    mask_k_bias: bool = False
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    in_chans: int = 3
    pos_embed_rope_base: float = 100.0
    pos_embed_rope_rescale_coords: float | None = None
    pos_embed_rope_dtype: str = "bf16"
    embed_dim: int | None = None  # ours: override the arch's trunk (tiny debug models)
    depth: int | None = None      # ours
    num_heads: int | None = None  # ours


@dataclass
class TeacherConfig:
    """DINOv3 `teacher:`: EMA momentum and teacher temperature schedules."""
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30


@dataclass
class WeightSchedule:
    """DINOv3's `linear_warmup_cosine_decay` for a loss weight: `start` -> `peak` linearly over
    `warmup_epochs`, cosine to `end` over `cosine_epochs` (None: the rest of the run), then `end`."""
    start: float
    peak: float
    end: float
    warmup_epochs: float = 0
    cosine_epochs: float | None = None


@dataclass
class DINOConfig:
    """DINOv3 `dino:`: the CLS-token head and loss, and KoLeo."""
    loss_weight: float = 1.0
    global_ignore_diagonal: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    koleo_loss_distributed: bool = False
    koleo_topk: int = 1
    koleo_distributed_loss_group_size: int | None = None
    reweight_dino_local_loss: bool = False  # scale the local DINO term by local_loss_weight_schedule
    local_loss_weight_schedule: WeightSchedule = field(default_factory=lambda: WeightSchedule(0.5, 0.5, 0.5, 0))


@dataclass
class IBOTConfig:
    """DINOv3 `ibot:`: masked-patch head and loss, and the block masking."""
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class GramConfig:
    """DINOv3 `gram:`: Gram anchoring against a frozen copy of the EMA teacher."""
    use_loss: bool = False
    loss_weight: float = 1.0
    ema_teacher: bool = False
    it_load_ema_teacher: int = -1
    rep_update: bool = True
    update_frequency: int = 50000
    it_first_update: int = 0
    max_updates: int | None = None
    normalized: bool = True
    img_level: bool = False
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: str = "all"
    global_teacher_resize_method: str = "bicubic"
    global_teacher_resize_antialias: bool = False
    loss_weight_schedule: WeightSchedule | None = None  # replaces loss_weight when set


@dataclass
class OptimConfig:
    """DINOv3 `optim:`: AdamW, its schedules and parameter groups."""
    epochs: int = 100
    schedule: str = "cosine"  # ours: "cosine" (DINOv3's v1) or "constant" after warmup (its 7B run's
                              # v2 `schedules:`, whose warmups leave out their endpoint)
    lr: float = 0.001  # the base lr (DINOv3's default); the scaling rule turns it into the peak lr
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # DINOv3's ssl_default_config (its ViT-L recipe)
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1
    scaling_rule: str = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    dino_head_wd_multiplier: float = 1.0
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    """DINOv3 `crops:`: the multi-crop augmentation."""
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = 224
    local_crops_size: int = 96
    gram_teacher_crops_size: int | None = None
    gram_teacher_no_distortions: bool = False
    horizontal_flips: bool = True
    rgb_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    rgb_std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """DINOv3 `train:` plus our run options (steps, ops, ac, logging, data)."""
    batch_size_per_gpu: int = 64
    dataset_path: str = "synthetic"  # "synthetic" or a folder of JPEG/PNG files
    output_dir: str = "./output"
    seed: int = 0
    OFFICIAL_EPOCH_LENGTH: int = 1250
    centering: str = "sinkhorn_knopp"
    compile: bool = False
    steps: int | None = None  # ours: iterations to run (None: epochs * OFFICIAL_EPOCH_LENGTH)
    ac: str = "none"          # ours: activation checkpointing "none" | "full" | "selective"
    ops: str = "fused"        # ours: "fused" (fastest backend per op) | "reference" (plain PyTorch)
    log_every: int = 10       # ours
    profile_steps: int = 0    # ours: profile the last this many steps (train/profiling.py); they
                              # form their own logged interval, marked "profiled", which
                              # throughput figures skip
    image_size: int | None = None  # ours: source image side (synthetic / resized folder images)
    synthetic_classes: int = 8     # ours
    device: str | None = None      # ours: default cuda if present, else cpu


@dataclass
class ComputePrecisionConfig:
    """DINOv3 `compute_precision:`: FSDP2 mixed precision (param dtype, gradient reduce dtype)."""
    param_dtype: str = "bf16"
    reduce_dtype: str = "fp32"
    single_rank_fsdp: bool = True  # ours: one CUDA process with a low-precision param_dtype still
                                   # runs FSDP2 (on a 1-rank group), so its modules and residual
                                   # stream are in param_dtype, as DINOv3's are at any world size;
                                   # false: fp32 modules under torch.autocast (torchtitan's way)


@dataclass
class CheckpointingConfig:
    """DINOv3 `checkpointing:`: save every `period` iterations (0: only at the end, -1: never), keep the last few.
    A run saves at its end too; DINOv3's period (3750), so a long run that fails keeps its last checkpoint."""
    period: int = 3750
    max_to_keep: int = 3


@dataclass
class EvaluationConfig:
    """DINOv3 `evaluation:` (ours inside): the kNN probe on the synthetic data's hidden labels."""
    eval_period_iterations: int = 0  # 0: only at the end
    knn_k: int = 20
    knn_train_samples: int = 512
    knn_val_samples: int = 256


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def total_steps(self) -> int:
        return self.train.steps if self.train.steps is not None else self.optim.epochs * self.train.OFFICIAL_EPOCH_LENGTH

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- dict <-> dataclass

def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{where} must not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            out = hint(value) if not isinstance(value, str) else hint(float(value) if hint is float else int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return out
    if hint is str:
        if isinstance(value, (dict, list)):  # e.g. an unquoted `a: b` in an override, read as a mapping
            raise ConfigError(f"{where} must be a string, got {value!r} (quote it)")
        return str(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping with keys {[f.name for f in dataclasses.fields(hint)]}, "
                             f"got {value!r}")
        hints = typing.get_type_hints(hint)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ConfigError(f"unknown config key {where}.{unknown[0]}; keys of {where}: {sorted(hints)}")
        missing = [f.name for f in dataclasses.fields(hint)
                   if f.name not in value and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where} needs the keys {missing}")
        return hint(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})
    return value


# DINOv3 keys we accept and translate (its AC booleans), or accept and ignore (cluster plumbing).
_DINOV3_ALIASES = {("train", "checkpointing"): ("train", "ac", lambda v: "selective" if v else None),
                   ("train", "checkpointing_full"): ("train", "ac", lambda v: "full" if v else None)}
_DINOV3_IGNORED = {("train", "num_workers"), ("train", "cache_dataset"), ("train", "saveckp_freq"),
                   ("optim", "multi_tensor_optim"), ("optim", "optimizer"), ("train", "use_teacher_head"),
                   ("MODEL", "META_ARCHITECTURE"), ("MODEL", "DEVICE"), ("MODEL", "DTYPE"),
                   ("evaluation", "low_freq_every"), ("evaluation", "config_files")}  # DINOv3's eval harness
# DINOv3 keys for features this trainer does not have, at the value that leaves them off (DINOv3's
# default), so DINOv3's own YAML files load: accepted at that value, a ConfigError at any other.
_DINOV3_OFF = {
    "MODEL": {"WEIGHTS": ""},
    "dino": {"head_norm_last_layer": False, "koleo_distributed_replicas": 0, "koleo_distributed_loss_group_data": True,
             "force_weight_norm": False},
    "ibot": {"mask_random_circular_shift": False, "force_masking_even_with_zero_weight": False,
             "head_norm_last_layer": False},
    "gram": {"compute_stats": False, "ckpt": None},
    "train": {"data_config": None, "monitor_gradient_norm": False, "chunk_schedule": [],
              "learn_from_teacher_tokens": False, "cudagraphs": False, "fsdp_reshard_after_forward": True,
              "sharded_eval_checkpoint": False, "cell_augmentation": False, "cell_augmentation_type": "hpa"},
    "student": {"patch_drop": 0.0, "pretrained_weights": "", "resume_from_teacher_chkpt": "", "pos_embed_type": "rope",
                "pos_embed_rope_min_period": None, "pos_embed_rope_max_period": None,
                "pos_embed_rope_normalize_coords": "separate", "pos_embed_rope_shift_coords": None,
                "pos_embed_rope_jitter_coords": None, "fp8_enabled": False, "fp8_filter": "blocks"},
    "teacher": {"in_chans": 3},
    "distillation": {"enabled": False, "full_cfg_path": "", "checkpoint_path": ""},
    "multidistillation": {"enabled": False},
    "hrft": {"enabled": False, "checkpoint_path": ""},
    "optim": {"schedule_trunc_extra": 0.0, "dump_fsdp_weights_path": ""},
    "crops": {"global_local_crop_pairs_ratios": 1.0, "localcrops_subset_of_globalcrops": False,
              "share_color_jitter": False, "teacher_to_student_resolution_scale": 1.0},
    "checkpointing": {"keep_every": 99999999999999999},
}


def _dinov3_only(section: str, key: str, value: Any) -> bool:
    """Whether section.key is a DINOv3 key this trainer accepts and drops (`_DINOV3_IGNORED`, or
    `_DINOV3_OFF` at its value); ConfigError for a `_DINOV3_OFF` key set to turn its feature on."""
    if (section, key) in _DINOV3_IGNORED:
        return True
    off = _DINOV3_OFF.get(section, {})
    if key not in off:
        return False
    if value != off[key]:
        raise ConfigError(f"{section}.{key}={value!r}: this DINOv3 option is not implemented here; "
                          f"remove it or set it to {off[key]!r}")
    return True


def update_config(cfg: Config, data: dict[str, Any]) -> Config:
    """A copy of `cfg` with the nested dict `data` ({section: {key: value}}) applied, typed."""
    cfg = copy.deepcopy(cfg)
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = [f.name for f in dataclasses.fields(cfg)]
    for section, values in data.items():
        if section not in sections and section not in _DINOV3_OFF:
            raise ConfigError(f"unknown config section {section!r}; sections: {sections}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        sub = getattr(cfg, section, None)
        hints = typing.get_type_hints(type(sub)) if sub is not None else {}
        for key, value in values.items():
            if _dinov3_only(section, key, value):
                continue
            if (section, key) in _DINOV3_ALIASES:
                _, target, fn = _DINOV3_ALIASES[(section, key)]
                mapped = fn(_coerce(value, bool, f"{section}.{key}"))
                if mapped is not None:
                    setattr(sub, target, mapped)
                continue
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}; keys of {section}: {sorted(hints)}")
            setattr(sub, key, _coerce(value, hints[key], f"{section}.{key}"))
    return cfg


def load_config(path: str | Path, base: str | Config = "cpu") -> Config:
    """A YAML file (DINOv3's layout) over a preset (or Config). Raises on unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = _parse_yaml(path.read_text(), f"config file {path}") or {}
    base_cfg = get_preset(base) if isinstance(base, str) else base
    return update_config(base_cfg, data)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml
    data = cfg.to_dict()
    Path(path).write_text(yaml.safe_dump(_lists(data), sort_keys=False))


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return [_lists(v) for v in x]
    return x


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """DINOv3's command-line `opts`: "section.key=value" strings, values parsed as YAML."""
    data: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override must look like section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = _parse_yaml(raw, f"override {item!r}")
    return update_config(cfg, data)


def _parse_yaml(text: str, what: str) -> Any:
    """yaml.safe_load(text), a ConfigError naming `what` (the file, the override) if it is not YAML."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None


def arch_overrides(arch: str) -> list[str]:
    """Overrides that make `arch` the student: the named arch, with any trunk override of the base
    config (the debug preset's tiny embed_dim / depth / num_heads) cleared, so the arch's own apply."""
    return [f"student.arch={arch}", "student.embed_dim=null", "student.depth=null", "student.num_heads=null"]


# --------------------------------------------------------------------------- validation

def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _unit(v) -> bool:
    return 0 <= v <= 1


def _scale(v) -> bool:
    return 0 < v[0] <= v[1] <= 1


# Range checks, (key, test, what is expected): each value that fails its test (None, where a key
# allows it, is not tested) is a ConfigError naming the key, where it would otherwise crash deep
# inside the model or a loss, or train silently on a wrong number (a negative lr, a zero std).
_RANGES = (
    ("student.patch_size", _positive, "a positive integer"),
    ("student.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("student.n_storage_tokens", _non_negative, ">= 0"),
    ("student.in_chans", lambda v: v == 3, "3 (the augmentation makes RGB crops)"),
    ("student.embed_dim", _positive, "a positive integer (or null: the arch's)"),
    ("student.depth", _positive, "a positive integer (or null: the arch's)"),
    ("student.num_heads", _positive, "a positive integer (or null: the arch's)"),
    ("student.ffn_ratio", _positive, "> 0 (or null: the arch's)"),
    ("teacher.momentum_teacher", _unit, "in [0, 1]"),
    ("teacher.final_momentum_teacher", _unit, "in [0, 1]"),
    ("teacher.warmup_teacher_temp", _positive, "> 0"),
    ("teacher.teacher_temp", _positive, "> 0"),
    ("teacher.warmup_teacher_temp_epochs", _non_negative, ">= 0"),
    *((f"{head}.head_{k}", _positive, "a positive integer")
      for head in ("dino", "ibot") for k in ("n_prototypes", "bottleneck_dim", "hidden_dim", "nlayers")),
    ("optim.epochs", _positive, "a positive integer"),
    ("optim.lr", _non_negative, ">= 0"),
    ("optim.min_lr", _non_negative, ">= 0"),
    ("optim.warmup_epochs", _non_negative, ">= 0"),
    ("optim.weight_decay", _non_negative, ">= 0"),
    ("optim.weight_decay_end", _non_negative, ">= 0"),
    ("optim.freeze_last_layer_epochs", _non_negative, ">= 0"),
    ("optim.patch_embed_lr_mult", _non_negative, ">= 0"),
    ("optim.layerwise_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.adamw_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adamw_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("crops.global_crops_scale", _scale, "(min, max) with 0 < min <= max <= 1"),
    ("crops.local_crops_scale", _scale, "(min, max) with 0 < min <= max <= 1"),
    ("crops.rgb_std", lambda v: min(v) > 0, "three positive values"),
    ("train.steps", _positive, "a positive integer (or null: optim.epochs x train.OFFICIAL_EPOCH_LENGTH)"),
    ("train.OFFICIAL_EPOCH_LENGTH", _positive, "a positive integer"),
    ("train.image_size", lambda v: v >= 8, ">= 8 (or null: 1.25 x the largest crop)"),
    ("train.synthetic_classes", _positive, "a positive integer"),
    ("checkpointing.period", lambda v: v >= -1, ">= -1 (0: only at the end, -1: never)"),
    ("evaluation.knn_val_samples", _non_negative, ">= 0 (0: no kNN probe)"),
)
_KNN_RANGES = (  # checked when the probe runs (evaluation.knn_val_samples > 0)
    ("evaluation.knn_k", _positive, "a positive integer"),
    ("evaluation.knn_train_samples", _positive, "a positive integer"),
)


def _check_ranges(cfg: Config) -> None:
    """Raise ConfigError for the first value out of its range (`_RANGES`, `_KNN_RANGES`)."""
    for key, ok, expected in _RANGES + (_KNN_RANGES if cfg.evaluation.knn_val_samples > 0 else ()):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _check_student(cfg: Config) -> None:
    """The student's arch, its trunk (the arch's, with the config's overrides) and its layer names,
    checked before anything is built (the model would raise without naming the config key)."""
    from dinov3_fast.models import ARCHS
    from dinov3_fast.models.ffn import FFN_LAYERS
    from dinov3_fast.models.norms import NORM_LAYERS
    from dinov3_fast.models.vision_transformer import ROPE_DTYPES
    s = cfg.student
    if s.arch not in ARCHS:
        raise ConfigError(f"student.arch: unknown arch {s.arch!r}; choose from {sorted(ARCHS)}")
    for key, value, choices in (("student.ffn_layer", s.ffn_layer, FFN_LAYERS),
                                ("student.norm_layer", s.norm_layer, NORM_LAYERS),
                                ("student.pos_embed_rope_dtype", s.pos_embed_rope_dtype, ROPE_DTYPES)):
        if value not in choices:
            raise ConfigError(f"{key} must be one of {tuple(choices)}, got {value!r}")
    embed_dim = s.embed_dim or ARCHS[s.arch]["embed_dim"]
    num_heads = s.num_heads or ARCHS[s.arch]["num_heads"]
    if embed_dim % num_heads:
        raise ConfigError(f"student.embed_dim ({embed_dim}) must be divisible by student.num_heads ({num_heads}); "
                          f"null takes {s.arch}'s")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError (a ValueError) naming the key for any setting the trainer cannot run."""
    s, c, t = cfg.student, cfg.crops, cfg.train
    _check_ranges(cfg)
    _check_student(cfg)
    for name, size in (("crops.global_crops_size", c.global_crops_size), ("crops.local_crops_size", c.local_crops_size),
                       ("crops.gram_teacher_crops_size", c.gram_teacher_crops_size)):
        if size is not None and (size <= 0 or size % s.patch_size):
            raise ConfigError(f"{name} ({size}) must be a positive multiple of student.patch_size ({s.patch_size})")
    if c.local_crops_number < 1:
        raise ConfigError(f"crops.local_crops_number must be >= 1 (DINOv3 asserts it), got {c.local_crops_number}")
    if t.batch_size_per_gpu < 2:
        raise ConfigError(f"train.batch_size_per_gpu must be >= 2 (KoLeo needs two samples), got {t.batch_size_per_gpu}")
    group = cfg.dino.koleo_distributed_loss_group_size
    if cfg.dino.koleo_loss_distributed and group is not None:
        total = t.batch_size_per_gpu * world_size
        if group % t.batch_size_per_gpu or total % group:
            raise ConfigError(f"dino.koleo_distributed_loss_group_size ({group}) must be a multiple of "
                             f"train.batch_size_per_gpu ({t.batch_size_per_gpu}) and divide the global batch ({total})")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0 <= lo < hi <= 1:
        raise ConfigError(f"ibot.mask_ratio_min_max must satisfy 0 <= min < max <= 1, got {(lo, hi)}")
    if not 0 <= cfg.ibot.mask_sample_probability <= 1:
        raise ConfigError(f"ibot.mask_sample_probability must be in [0, 1], got {cfg.ibot.mask_sample_probability}")
    if t.ac not in AC_MODES:
        raise ConfigError(f"train.ac must be one of {AC_MODES}, got {t.ac!r}")
    if t.profile_steps < 0:
        raise ConfigError(f"train.profile_steps must be >= 0, got {t.profile_steps}")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be >= 1, got {t.log_every}")
    if t.ops not in OPS_MODES:
        raise ConfigError(f"train.ops must be one of {OPS_MODES}, got {t.ops!r}")
    if t.centering != "sinkhorn_knopp":
        raise ConfigError(f"train.centering: only 'sinkhorn_knopp' is implemented (DINOv3 asserts it), got {t.centering!r}")
    if not cfg.ibot.separate_head:
        raise ConfigError("ibot.separate_head must be true: the iBOT head is always separate from the DINO head "
                          "(DINOv3 asserts it)")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.optim.schedule!r}")
    if cfg.optim.scaling_rule not in ("sqrt_wrt_1024", "linear_wrt_256", "none"):
        raise ConfigError(f"optim.scaling_rule must be sqrt_wrt_1024, linear_wrt_256 or none, got {cfg.optim.scaling_rule!r}")
    for name, v in (("compute_precision.param_dtype", cfg.compute_precision.param_dtype),
                    ("compute_precision.reduce_dtype", cfg.compute_precision.reduce_dtype)):
        if v == "fp16":
            raise ConfigError(f"{name}=fp16 is not supported: the loop has no loss scaling (GradScaler), so "
                             "fp16 gradients would underflow silently; use bf16 (DINOv3's precision, fp32's range)")
        if v not in DTYPES:
            raise ConfigError(f"{name} must be one of {DTYPES}, got {v!r}")
    for name, ws, on in (("dino.local_loss_weight_schedule", cfg.dino.local_loss_weight_schedule,
                          cfg.dino.reweight_dino_local_loss),
                         ("gram.loss_weight_schedule", cfg.gram.loss_weight_schedule, cfg.gram.use_loss)):
        if on and ws is not None and (ws.warmup_epochs < 0 or (ws.cosine_epochs is not None and ws.cosine_epochs <= 0)):
            raise ConfigError(f"{name}: warmup_epochs must be >= 0 and cosine_epochs > 0 (or null), got {ws}")
    g = cfg.gram
    if g.use_loss:
        if g.tokens_used not in ("all", "masked", "unmasked"):
            raise ConfigError(f"gram.tokens_used must be all, masked or unmasked, got {g.tokens_used!r}")
        if g.tokens_used != "all" and g.img_level:
            raise ConfigError("gram.img_level must be false when gram.tokens_used is masked/unmasked (as in DINOv3)")
        if g.ema_teacher and g.rep_update:
            raise ConfigError("gram.ema_teacher and gram.rep_update are exclusive (as in DINOv3)")
        if not g.ema_teacher and g.it_load_ema_teacher < 0:
            raise ConfigError("gram.it_load_ema_teacher must be >= 0 when the Gram teacher is a copy of the EMA teacher")
        if not g.ema_teacher and c.gram_teacher_crops_size is None:
            raise ConfigError("crops.gram_teacher_crops_size must be set to use the Gram loss with a Gram teacher")
        if g.ema_teacher and c.gram_teacher_crops_size is not None:
            raise ConfigError("crops.gram_teacher_crops_size must be null when gram.ema_teacher=true (as in DINOv3): "
                              "the EMA teacher's targets come from the global crops")
        if g.rep_update and g.update_frequency < 1:
            raise ConfigError(f"gram.update_frequency must be >= 1, got {g.update_frequency}")
        if g.remove_neg and g.remove_only_teacher_neg:
            raise ConfigError("gram.remove_neg and gram.remove_only_teacher_neg are mutually exclusive")


# --------------------------------------------------------------------------- presets

def _small_heads(k: int, hidden: int, bottleneck: int) -> dict[str, Any]:
    return dict(head_n_prototypes=k, head_hidden_dim=hidden, head_bottleneck_dim=bottleneck)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A two-block ViT at 32/16 px: one step takes milliseconds on a CPU (tests, CI smoke runs).
    "debug": {
        # fp32 RoPE (DINOv3's default is bf16): the golden loss trace runs this preset at rtol 1e-5
        # across machines, and bf16 tables would turn an ISA's ulp-level change of an angle into a
        # whole bf16 rounding step
        "student": dict(arch="vit_small", patch_size=8, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0, layerscale=1e-5,
                        n_storage_tokens=1, pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32"),
        "dino": _small_heads(256, 128, 32),
        "ibot": dict(_small_heads(256, 128, 32), mask_ratio_min_max=(0.1, 0.5)),
        "crops": dict(global_crops_size=32, local_crops_size=16, local_crops_number=2,
                      global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5)),
        "optim": dict(epochs=1, lr=5e-3, warmup_epochs=0.1, weight_decay=0.04, weight_decay_end=0.04,
                      freeze_last_layer_epochs=0, scaling_rule="none", layerwise_decay=0.9),
        "teacher": dict(momentum_teacher=0.99, final_momentum_teacher=0.999, warmup_teacher_temp_epochs=0.1),
        "train": dict(batch_size_per_gpu=16, OFFICIAL_EPOCH_LENGTH=50, image_size=48, log_every=10),
        "compute_precision": dict(param_dtype="fp32", reduce_dtype="fp32"),
        "evaluation": dict(knn_train_samples=256, knn_val_samples=128, knn_k=10),
    },
    # ViT-S/16 at 64/32 px: `dinov3-fast train --arch vit_small --data synthetic --steps 200` on a CPU.
    "cpu": {
        "student": dict(arch="vit_small", drop_path_rate=0.1, layerscale=1e-5, n_storage_tokens=4,
                        pos_embed_rope_rescale_coords=2.0),
        "dino": _small_heads(4096, 512, 128),
        "ibot": _small_heads(4096, 512, 128),
        "crops": dict(global_crops_size=64, local_crops_size=32, local_crops_number=4),
        "optim": dict(epochs=1, lr=2e-3, warmup_epochs=0.1, weight_decay_end=0.04, freeze_last_layer_epochs=0,
                      scaling_rule="none"),
        "teacher": dict(momentum_teacher=0.99, final_momentum_teacher=0.999, warmup_teacher_temp_epochs=0.2),
        "train": dict(batch_size_per_gpu=16, OFFICIAL_EPOCH_LENGTH=200, image_size=96),
        "compute_precision": dict(param_dtype="fp32", reduce_dtype="fp32"),
    },
    # DINOv3's ViT-L/16 recipe on one H100: 2 x 224 global + 8 x 96 local crops, the published
    # backbone options, 65k-prototype heads, selective AC, per-block compile, bf16 params.
    # fp32 RoPE, not DINOv3's default bf16: the published backbones' option (dinov3/hub), and the
    # one this preset's committed H100 runs and memory plans were measured with.
    "vitl16_h100": {
        "student": dict(arch="vit_large", drop_path_rate=0.3, layerscale=1e-5, n_storage_tokens=4, mask_k_bias=True,
                        pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32"),
        "crops": dict(global_crops_size=224, local_crops_size=96, local_crops_number=8),
        "train": dict(batch_size_per_gpu=64, ac="selective", compile=True, image_size=256),
        "compute_precision": dict(param_dtype="bf16", reduce_dtype="fp32"),
    },
    # DINOv3's 7B recipe, pretraining stage (dinov3/configs/train/dinov3_vit7b16_pretrain.yaml): 256/112
    # crops, 262k/98k-prototype heads, betas (0.9, 0.99), clip 30, layer decay 0.98, no horizontal flips,
    # non-distributed KoLeo; its v2 `schedules:` as constants after warmup: lr 5e-5 (sqrt_wrt_1024-scaled)
    # warmed up over 100 epochs, last layer frozen 5 epochs, wd 0.04, EMA momentum 0.994, teacher temp
    # 0.04 -> 0.07 over 100 epochs; 1000 epochs of 1000 iterations.
    "vit7b16": {
        "student": dict(arch="vit_7b", drop_path_rate=0.4, layerscale=1e-5, n_storage_tokens=4, mask_k_bias=True,
                        qkv_bias=False, ffn_layer="swiglu64", norm_layer="layernormbf16",
                        untie_global_and_local_cls_norm=True, pos_embed_rope_rescale_coords=2.0,
                        pos_embed_rope_dtype="fp32"),
        "dino": dict(head_n_prototypes=262144, head_hidden_dim=8192, head_bottleneck_dim=512,
                     koleo_loss_distributed=False, koleo_topk=1, koleo_distributed_loss_group_size=None),
        "ibot": dict(head_n_prototypes=98304, head_hidden_dim=4096, head_bottleneck_dim=384),
        "crops": dict(global_crops_size=256, local_crops_size=112, local_crops_number=8, horizontal_flips=False),
        "optim": dict(epochs=1000, schedule="constant", lr=5e-5, min_lr=5e-5, warmup_epochs=100,
                      freeze_last_layer_epochs=5, weight_decay=0.04, weight_decay_end=0.04,
                      scaling_rule="sqrt_wrt_1024", adamw_beta2=0.99, clip_grad=30.0, layerwise_decay=0.98),
        "teacher": dict(momentum_teacher=0.994, final_momentum_teacher=0.994, warmup_teacher_temp=0.04,
                        teacher_temp=0.07, warmup_teacher_temp_epochs=100),
        "train": dict(batch_size_per_gpu=16, OFFICIAL_EPOCH_LENGTH=1000, ac="selective", compile=True,
                      image_size=288),
        "checkpointing": dict(period=1000, max_to_keep=3),
        "compute_precision": dict(param_dtype="bf16", reduce_dtype="fp32"),
    },
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return update_config(Config(), PRESETS[name])
