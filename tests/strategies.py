"""Hypothesis strategies shared by the property tests of every loss: label and group ids at their
dtypes' extreme values, feature rows of extreme magnitudes with tied rows."""
import torch
from hypothesis import strategies as st

LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32]
# row magnitudes: ordinary, below eps (1e-12: scaled by 1/eps as F.normalize), huge, zero
MAGNITUDES = [1.0, 1.0, 1.0, 1e-3, 1e-30, 1e20, 1e37, 0.0]


def _extremes(dtype):
    info = torch.iinfo(dtype)
    values = {info.min, info.min + 1, info.max, info.max - 1, 0, 1, 2, -1, -2, 2**31, 2**32, 2**31 - 1}
    return sorted(v for v in values if info.min <= v <= info.max)


@st.composite
def ids(draw, rows, dtype, values):
    return torch.tensor(draw(st.lists(st.sampled_from(values), min_size=rows, max_size=rows)),
                        dtype=torch.int64).to(dtype)


@st.composite
def features(draw, rows, d, dtype):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    scale = draw(st.lists(st.sampled_from(MAGNITUDES), min_size=rows, max_size=rows))
    x = x / x.abs().amax(dim=1, keepdim=True).clamp(min=1e-300) * torch.tensor(scale, dtype=torch.float64)[:, None]
    if rows > 1 and draw(st.booleans()):
        x[-1] = x[0]  # a repeated row: exactly tied scores
    return x.to(dtype)
