import re

import pytest
import torch

from cdcl_nuclei import models


def test_paper_encoder_is_densenet161():
    m = models.DenseNetEncoder(growth=48, blocks=(6, 12, 36, 24), init_features=96, bn_size=4)
    # torchvision's densenet161 has 28,681,000 parameters, 2,209,000 of them in the ImageNet classifier
    assert sum(p.numel() for p in m.parameters()) == 28_681_000 - 2_209_000
    keys = m.state_dict().keys()
    assert "features.denseblock3.denselayer36.conv2.weight" in keys
    assert "features.transition3.conv.weight" in keys
    assert "features.norm5.running_var" in keys
    assert m.out_channels == 2208 and m.skip_channels == [384, 768, 2112]


def test_tiny_model_shapes_and_bad_input():
    cfg = models.model_config("tiny")
    m = models.build_model(cfg).eval()
    out = m(torch.randn(2, 3, 64, 96), features=True)
    assert out["logits"].shape == (2, 2, 64, 96)
    assert out["logits_low"].shape == (2, 2, 16, 24)
    assert out["proj"].shape == (2, cfg.proj[1], 8, 12)
    assert "proj" not in m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        m(torch.randn(1, 3, 48, 64))


def test_small_preset_predicts_at_stride_2_and_projects_at_stride_8():
    cfg = models.model_config("small")
    m = models.build_model(cfg).eval()
    out = m(torch.randn(1, 3, 64, 128), features=True)
    assert out["logits_low"].shape == (1, 2, 32, 64) and out["logits"].shape == (1, 2, 64, 128)
    assert out["proj"].shape == (1, cfg.proj[1], 8, 16)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = models.build_model(models.model_config("tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(m(x)["logits"], m(x)["logits"])
    assert any(isinstance(mod, torch.nn.Dropout2d) and mod.p == 0.3 for mod in m.modules())


def test_load_pretrained_torchvision_state_dict(tmp_path):
    cfg = models.model_config("tiny")
    src = models.build_model(cfg)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.encoder.state_dict().items()}
    # a torchvision file: ImageNet classifier keys and the old 'norm.1' spelling
    tv = {re.sub(r"(denselayer\d+\.norm)1\.", r"\1.1.", k): v for k, v in state.items()}
    tv["classifier.weight"] = torch.randn(1000, 8)
    tv["classifier.bias"] = torch.randn(1000)
    path = tmp_path / "densenet.pth"
    torch.save(tv, path)
    dst = models.build_model(cfg, pretrained=str(path))
    for k, v in dst.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    bad = dict(tv)
    bad["features.conv0.weight"] = torch.randn(3, 3, 3, 3)
    torch.save(bad, path)
    with pytest.raises(ValueError, match="does not match"):
        models.build_model(cfg, pretrained=str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="pretrained"):
        models.build_model(cfg, pretrained=str(path))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        models.model_config("huge")
