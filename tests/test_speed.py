"""Speed figures: paired per-round ratios, their spread, when a figure is trusted, and the reducer share."""

import pytest
import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto import speed


def test_speedups_are_medians_of_paired_rounds():
    # round 2 is slow for everyone (a burst of load): paired ratios stay 2×, the img/s spread does not
    base, half = [1.0, 3.0, 1.0, 1.0, 1.0], [0.5, 1.5, 0.5, 0.5, 0.5]
    ref, fast = speed.summarise([base, half], batch_size=4)
    assert (ref.speedup, ref.speedup_spread, ref.reps) == (1.0, 0.0, 5)
    assert (fast.speedup, fast.speedup_spread) == (2.0, 0.0)
    assert fast.images_per_s == 8.0 and ref.images_per_s == 4.0
    assert fast.trusted and ref.trusted


def test_spread_and_too_few_rounds_make_a_figure_untrusted():
    noisy = speed.summarise([[1.0] * 6, [0.5, 1.0, 0.5, 1.0, 0.5, 1.0]], batch_size=1)[1]
    assert noisy.speedup_spread == pytest.approx(speed.relative_iqr([2.0, 1.0, 2.0, 1.0, 2.0, 1.0]))
    assert noisy.uncertainty == pytest.approx(1.58 * noisy.speedup_spread / 6**0.5)
    assert noisy.uncertainty > speed.MAX_SPREAD and not noisy.trusted
    # a spread that 36 rounds pin down: the median is known to ±1.58·IQR/6
    steady = speed.summarise([[1.0] * 36, [0.4, 0.6, 0.45, 0.55] * 9], batch_size=1)[1]
    assert steady.speedup_spread > speed.MAX_SPREAD and steady.uncertainty < speed.MAX_SPREAD and steady.trusted
    few = speed.summarise([[1.0] * 3, [0.5] * 3], batch_size=1)[1]
    assert few.speedup_spread == 0 and few.reps < speed.MIN_REPS and not few.trusted


def test_relative_iqr():
    assert speed.relative_iqr([1.0]) == 0.0
    assert speed.relative_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)


def test_measure_times_every_reducer_and_restores_the_model(one_thread):
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", img_size=32, depth=4, embed_dim=32).eval()
    own = R.apply(model, "mtr", r=0.2, blocks=[2])
    merge = R.apply(model, "rmeeto", r=4)
    R.attach(model, own)
    x = torch.randn(2, 3, 32, 32)
    speeds = speed.measure(model, [None, merge, None], x, warmup=1, reps=2, max_reps=3)
    assert [s.reps for s in speeds] in ([2] * 3, [3] * 3), "paired rounds: every reducer timed as often"
    assert speeds[0].speedup == 1.0 and all(s.images_per_s > 0 for s in speeds)
    assert model.token_reducer is own and model.layers[1].mixer.record
    share = speed.with_reducer(model, merge, lambda: speed.reducer_share(model, x, reps=1))
    assert 0 < share < 1 and model.token_reducer is own
    assert speed.reducer_share(rmeeto.create_model("vim_demo", img_size=32, depth=2), x) == 0.0
    with pytest.raises(ValueError, match="reps must be at least 1"):
        speed.measure(model, [None], x, reps=0)


def test_default_speed_batch_is_larger_on_a_gpu():
    assert speed.default_speed_batch("cuda") == 128 > speed.default_speed_batch("cpu")
