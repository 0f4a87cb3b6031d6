"""The fair random baseline: several seeds, at equal FLOPs and at MTR's token count."""

import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.findings import format_random_rows, random_baseline


def test_random_baseline_over_seeds_at_equal_flops_and_equal_tokens():
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", depth=4, embed_dim=32).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 64, 64, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(2)]
    rows = random_baseline(model, lambda: batches, 10, cuts=[0.2], seeds=[0, 1, 2])
    flops_row, tokens_row = rows
    assert model.token_reducer is None
    assert (flops_row.match, tokens_row.match) == ("flops", "tokens")
    assert tokens_row.r == R.apply(model, "mtr", flops_cut=0.2).schedule.r[0]  # MTR's own ratio
    assert tokens_row.gflops < tokens_row.mtr_gflops  # the same tokens without MTR's matching cost
    assert flops_row.r <= tokens_row.r  # at equal FLOPs random removes no more tokens than MTR
    assert len(tokens_row.top1_seeds) == 3 and min(tokens_row.top1_seeds) <= tokens_row.top1_mean
    assert "MTR tokens" in format_random_rows(rows)
