from sparsevar.flops import flops_ratio, generation_flops
from sparsevar.generate import StageStats


def stages(kept_last: int, branches: tuple[int, int, int] = (1, 1, 1)) -> list[StageStats]:
    sizes = [(1, 1, 1, 1), (2, 2, 2, 4), (3, 4, 4, 16)]
    return [StageStats(*size, kept_last if size[0] == 3 else size[3], 0.0, branches=rows)
            for size, rows in zip(sizes, branches, strict=True)]


def test_dense_flops_follow_the_spec_formula():
    # stage sizes 1, 4, 16 with P=10, d=2, one block: linear 2*10*21, attention 4*2*(1*1 + 4*5 + 16*21)
    assert generation_flops(stages(16), block_params=10, dim=2, depth=1, dense=True) == 2 * 10 * 21 + 8 * 357


def test_ratio_is_one_when_everything_runs_and_grows_as_tokens_are_left_out():
    assert flops_ratio(stages(16), 10, 2, 3) == 1.0
    assert 1.0 < flops_ratio(stages(8), 10, 2, 3) < flops_ratio(stages(4), 10, 2, 3)


def test_stages_without_guidance_cost_one_row_of_two():
    guided, cut = stages(16, (2, 2, 2)), stages(16, (2, 2, 1))
    assert generation_flops(guided, 10, 2, 1, dense=False) == 2 * generation_flops(stages(16), 10, 2, 1, dense=True)
    assert generation_flops(cut, 10, 2, 1, dense=True) == generation_flops(guided, 10, 2, 1, dense=True)
    assert flops_ratio(cut, 10, 2, 1) > 1.0 == flops_ratio(guided, 10, 2, 1)
