"""The recipes: every one builds, at both scales, into valid cells; one runs end to end (tiny)."""
import pytest

from fedsim.config import ConfigError
from fedsim.recipes import RECIPES, SCALES, build, main


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds(name, scale):
    sweep = build(name, scale)
    cells = sweep.cells()
    assert cells and all(c.config.validation_fraction > 0 for c in cells)
    assert len(cells[0].config.seeds) >= 5  # paired comparisons over at least 5 seeds
    for c in cells:
        if name == "and-mask-spirals":
            assert c.config.dataset == "spirals"
        elif name == "irm-cmnist":
            assert c.config.dataset.startswith("irm-fashion-mnist")
        elif scale == "full":
            assert c.config.dataset.startswith(("colored-mnist", "colored-fashion-mnist"))
        else:
            assert c.config.dataset.startswith("colored-digits")


def test_the_positive_control_is_the_and_mask_as_fedsgd():
    """Every client every round, one local step; the AND-mask's cell is a hard mask at τ = 1,
    rescaled, on server Adam with bias correction and L2 after the mask; FedAvg runs once per
    number of local steps."""
    sweep = build("and-mask-spirals", "small")
    cells = {c.name: c.config for c in sweep.cells()}
    and_mask = cells["local_steps=1,gma_mask=hard,gma_tau=1.0"]
    assert and_mask.algorithms == ("fedgma",) and and_mask.gma_rescale
    assert (and_mask.local_steps, and_mask.clients_per_round) == (1, and_mask.num_clients)
    assert (and_mask.server_optimizer, and_mask.server_bias_correction,
            and_mask.server_weight_decay) == ("adam", True, 1e-3)
    assert cells["local_steps=1"].algorithms == ("fedavg",)
    assert sorted({c.config.local_steps for c in build("and-mask-spirals", "full").cells()}) \
        == [1, 2, 5, 20]


def test_the_workshop_setting_is_literal():
    sweep = build("workshop-fig2", "small")
    config = sweep.cells()[0].config
    assert (config.local_epochs, config.lr, config.fedgma_v1_p) == (3, 0.001, 0.8)
    assert set(sweep.conditions) == {"dataset", "split"}
    assert {c.config.algorithms for c in sweep.cells()} == {("fedavg", "fedgma-v1")}


def test_unknown_recipe_or_scale():
    with pytest.raises(ConfigError, match="unknown recipe 'fig9'"):
        build("fig9", "small")
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        build("fair-ood", "huge")
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        build("fair-ood", "small", {"rounds": 0})


def test_fair_ood_runs_end_to_end(tmp_path, capsys):
    report = main(["fair-ood", "--seeds", "0", "--rounds", "2", "--quiet",
                   "--out-dir", str(tmp_path)])
    (sweep_dir,) = tmp_path.iterdir()
    assert (sweep_dir / "ood_by_condition.png").is_file()
    methods = {s["method"] for s in report["selection"]}
    assert methods == {"fedavg", "fedgma", "fedavg (step x fedgma density)"}
    assert {tuple(s["condition"].items()) for s in report["selection"]} == {
        (("reversed_color_fraction", 0.0),), (("reversed_color_fraction", 0.3),)}
    assert "Each method at its settings chosen on validation" in capsys.readouterr().out


def test_the_irm_protocol_is_fedsgd_at_the_papers_settings():
    small = build("irm-cmnist", "small").cells()
    assert {c.config.dataset for c in small} == {"irm-fashion-mnist", "irm-fashion-mnist-gray"}
    config = small[0].config
    assert (config.num_clients, config.clients_per_round, config.local_steps, config.lr) == \
        (2, 2, 1, 1.0)
    assert config.batch_size >= 5000 and config.rounds == 501  # full batch, the paper's steps
    assert (config.irm_penalty_weight, config.irm_anneal_rounds) == (91257.186, 190)
    full = build("irm-cmnist", "full").cells()
    assert sorted({c.config.reversed_color_fraction for c in full}) == [0.0, 0.1, 0.2, 0.3,
                                                                         0.4, 0.5]
    assert all(c.config.ood_validation_fraction == 0.5 for c in full)
    assert all(c.config.max_train == config.max_train == 11112 for c in full)
    assert build("irm-cmnist", "full").step_size_control
    assert not build("irm-cmnist", "small").step_size_control
