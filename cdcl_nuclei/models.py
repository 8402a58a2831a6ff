"""DenseUNet with a DenseNet encoder, classifier and projector heads.

The encoder has the architecture and the state_dict key names of torchvision's DenseNet
(``features.conv0``, ``features.denseblock1.denselayer1.norm1``, ...), so ``load_pretrained`` takes a
torchvision ``densenet161`` state dict from a local file. The decoder has 3 up-blocks (bilinear x2,
add the encoder skip, 3x3 conv, BN, ReLU) down to stride 4, and with a fourth decoder width a
fourth up-block to stride 2 on the encoder's stem (sharper boundaries for small nuclei; the CPU
preset has it, the paper's model does not); the classifier (3x3 conv -> hidden, dropout2d, 1x1 conv
-> classes) predicts at the decoder's last stride and is upsampled to the input; the projector (2x2
average pool, 1x1 conv, ReLU, 1x1 conv) gives the contrastive features at stride 8, from the
stride-4 decoder output.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    growth: int = 48
    blocks: tuple = (6, 12, 36, 24)
    init_features: int = 96
    bn_size: int = 4
    decoder: tuple = (768, 384, 256)
    cls_hidden: int = 64
    proj: tuple = (256, 128)
    num_classes: int = 2  # 3 for the boundary target (targets.NUM_CLASSES)
    dropout: float = 0.3
    input_size: int = 320


PRESETS = {
    # DenseNet-161 encoder, the paper's model
    "paper": ModelConfig(),
    # a narrow DenseNet that trains on a couple of CPU cores; its decoder goes on to stride 2
    "small": ModelConfig(growth=16, blocks=(2, 2, 2, 2), init_features=32, decoder=(64, 64, 64, 32),
                         cls_hidden=32, proj=(64, 32), input_size=128),
    # for tests only
    "tiny": ModelConfig(growth=4, blocks=(1, 1, 1, 1), init_features=8, decoder=(8, 8, 8),
                        cls_hidden=8, proj=(8, 8), input_size=64),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    d = asdict(PRESETS[preset])
    d.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(d)


# field: (allowed lengths for tuples or None for an int, smallest, largest); the ranges are far
# beyond any useful model and only stop a crafted config from allocating terabytes
INT_FIELDS = {"growth": (None, 1, 1024), "blocks": ((4,), 1, 256), "init_features": (None, 1, 4096),
              "bn_size": (None, 1, 64), "decoder": ((3, 4), 1, 8192), "cls_hidden": (None, 1, 8192),
              "proj": ((2,), 1, 8192), "num_classes": (None, 2, 3), "input_size": (None, 32, 16384)}
MAX_PARAMETERS = 10 ** 9


def _check_int(name, v, lo, hi):
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")


def config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from its dict form (a checkpoint's config["model"]; lists become tuples), with
    every field's type and range checked and the parameter count bounded before anything is built."""
    if not isinstance(d, dict):
        raise ValueError(f"model: expected a dict of model settings, got {type(d).__name__}")
    fields = set(asdict(ModelConfig()))
    unknown, missing = sorted(set(d) - fields), sorted(fields - set(d))
    if unknown or missing:
        raise ValueError(f"model: unknown fields {unknown}, missing fields {missing}")
    out = {}
    for name, (lengths, lo, hi) in INT_FIELDS.items():
        v = d[name]
        if lengths is None:
            _check_int(name, v, lo, hi)
        else:
            if not isinstance(v, (list, tuple)) or len(v) not in lengths:
                raise ValueError(f"{name}: expected {' or '.join(map(str, lengths))} integers, got {v!r}")
            for x in v:
                _check_int(name, x, lo, hi)
            v = tuple(v)
        out[name] = v
    if out["input_size"] % 32:
        raise ValueError(f"input_size: expected a multiple of 32, got {out['input_size']}")
    dropout = d["dropout"]
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    cfg = ModelConfig(**out, dropout=float(dropout))
    with torch.device("meta"):  # counts parameters without allocating them
        n = sum(p.numel() for p in DenseUNet(cfg).parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"parameters: these model settings give {n:.3g} parameters, more than {MAX_PARAMETERS:.0e}")
    return cfg


class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__()
        for i in range(n):
            self[f"denselayer{i + 1}"] = _DenseLayer(cin + i * growth, growth, bn_size)

    def forward(self, x):
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(OrderedDict(norm=nn.BatchNorm2d(cin), relu=nn.ReLU(inplace=True),
                                     conv=nn.Conv2d(cin, cout, 1, bias=False), pool=nn.AvgPool2d(2, 2)))


class DenseNetEncoder(nn.Module):
    """torchvision's DenseNet feature extractor; returns the block outputs at strides 4, 8, 16 and the
    final normalised features at stride 32."""

    def __init__(self, growth=48, blocks=(6, 12, 36, 24), init_features=96, bn_size=4):
        super().__init__()
        layers = OrderedDict(conv0=nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
                             norm0=nn.BatchNorm2d(init_features), relu0=nn.ReLU(inplace=True),
                             pool0=nn.MaxPool2d(3, 2, 1))
        c = init_features
        self.skip_channels = []
        for i, n in enumerate(blocks):
            layers[f"denseblock{i + 1}"] = _DenseBlock(n, c, growth, bn_size)
            c += n * growth
            if i != len(blocks) - 1:
                self.skip_channels.append(c)
                layers[f"transition{i + 1}"] = _Transition(c, c // 2)
                c //= 2
        layers["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(layers)
        self.out_channels = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        """(skips at strides 2 (the stem), 4, 8, 16; final features at stride 32)."""
        skips = []
        for name, module in self.features.named_children():
            if name.startswith("transition") or name == "pool0":
                skips.append(x)
            x = module(x)
        return skips, F.relu(x)


class UpBlock(nn.Module):
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.align = nn.Conv2d(cin, cskip, 1, bias=False) if cin != cskip else nn.Identity()
        self.conv = nn.Conv2d(cskip, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(self.align(x) + skip)))


class DenseUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.blocks) != 4 or len(cfg.decoder) not in (3, 4) or len(cfg.proj) != 2:
            raise ValueError("cfg: expected 4 dense blocks, 3 or 4 decoder widths and 2 projector widths, "
                             f"got {cfg.blocks}, {cfg.decoder}, {cfg.proj}")
        self.cfg = cfg
        self.encoder = DenseNetEncoder(cfg.growth, cfg.blocks, cfg.init_features, cfg.bn_size)
        skips = ([cfg.init_features] + self.encoder.skip_channels)[::-1]
        widths = (self.encoder.out_channels,) + tuple(cfg.decoder)
        self.decoder = nn.ModuleList(UpBlock(widths[i], skips[i], widths[i + 1])
                                     for i in range(len(cfg.decoder)))
        d = cfg.decoder[-1]
        self.classifier = nn.Sequential(
            nn.Conv2d(d, cfg.cls_hidden, 3, padding=1, bias=False), nn.BatchNorm2d(cfg.cls_hidden),
            nn.ReLU(inplace=True), nn.Dropout2d(cfg.dropout), nn.Conv2d(cfg.cls_hidden, cfg.num_classes, 1))
        self.projector = nn.Sequential(
            nn.AvgPool2d(2, 2), nn.Conv2d(cfg.decoder[2], cfg.proj[0], 1), nn.ReLU(inplace=True),
            nn.Conv2d(cfg.proj[0], cfg.proj[1], 1))

    def forward(self, x, features: bool = False):
        """Returns {'logits': (B, C, H, W) at the input size, 'logits_low': at the decoder's last
        stride (4 or 2)} and, with features=True, 'proj': projector features (B, D, H/8, W/8)."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"x: expected height and width divisible by 32, got {tuple(x.shape[-2:])}")
        skips, y = self.encoder(x)
        s4 = None
        for i, (block, skip) in enumerate(zip(self.decoder, skips[::-1])):
            y = block(y, skip)
            if i == 2:
                s4 = y
        low = self.classifier(y)
        out = {"logits_low": low,
               "logits": F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)}
        if features:
            out["proj"] = self.projector(s4)
        return out


_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_pretrained(model: DenseUNet, path) -> list[str]:
    """Load a torchvision DenseNet state dict (file) into the encoder; returns the ignored keys
    (the ImageNet classifier). Missing or mis-shaped encoder weights raise ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"pretrained: cannot read a state dict from {path} ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path} does not hold a state dict")
    fixed, ignored = {}, []
    for k, v in state.items():
        k = k.removeprefix("module.")
        m = _LEGACY_KEY.match(k)
        if m:  # old torchvision checkpoints spell norm1 as 'norm.1'
            k = m.group(1) + m.group(2)
        if k.startswith("features."):
            fixed[k] = v
        else:
            ignored.append(k)
    own = model.encoder.state_dict()
    for k in own:  # files older than BatchNorm's batch counter lack it; it plays no role in eval or Adam
        if k.endswith("num_batches_tracked") and k not in fixed:
            fixed[k] = own[k]
    missing = sorted(set(own) - set(fixed))
    bad = sorted(k for k in fixed if k in own and own[k].shape != fixed[k].shape)
    unexpected = sorted(set(fixed) - set(own))
    if missing or bad or unexpected:
        raise ValueError(f"pretrained: {path} does not match the encoder (missing {missing[:3]}, "
                         f"wrong shape {bad[:3]}, unexpected {unexpected[:3]}; "
                         f"{len(missing)}/{len(bad)}/{len(unexpected)} keys)")
    model.encoder.load_state_dict(fixed)
    return ignored


def build_model(cfg: ModelConfig, pretrained=None) -> DenseUNet:
    model = DenseUNet(cfg)
    if pretrained:
        load_pretrained(model, pretrained)
    return model
