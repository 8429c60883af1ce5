"""Seed 001 (DNIKit's PFA notebook on MobileNet / CIFAR-10): its calls run on moco unchanged, apart from the
producer (DNIKit's ``pipeline(dataset, mobilenet.model(conv2d_responses), Pooler(dim=(1, 2), method=MAX))``
becomes ``PFA.producer(images, model=mobilenet, layers=conv2d_responses)``). A small MobileNet on random
images keeps it fast; ``moco bench pfa-cifar`` runs it on the trained model and CIFAR-10."""

import pandas as pd
import torch
from torch import nn

from moco.compress.pfa import PFA, PFARecipe  # was: from dnikit.introspectors import PFA, PFARecipe
from moco.models import create


def test_seed001_notebook_calls_run_unchanged(tmp_path):
    torch.manual_seed(0)
    mobilenet = create("mobilenet_v1", width_multiplier=0.25).eval()
    images = torch.randn(320, 3, 32, 32)
    conv2d_responses = [name for name, m in mobilenet.named_modules()
                        if isinstance(m, nn.Conv2d) and "preds" not in name]
    producer = PFA.producer(images, model=mobilenet, layers=conv2d_responses)  # the one moco-specific line

    # ---- the notebook, cells [7] to [13]
    print('Analyzing responses, this may take a few minutes...')
    pfa = PFA.introspect(producer, batch_size=500)
    print('Done.')

    energy_8_recipes = pfa.get_recipe(
        strategy=PFA.Strategy.Energy(energy_threshold=0.8, min_kept_count=3)
    )
    energy_99_recipes = pfa.get_recipe(
        strategy=PFA.Strategy.Energy(energy_threshold=0.99, min_kept_count=3)
    )
    print("Done running PFA Energy")
    results_table = PFA.show((energy_8_recipes, energy_99_recipes))
    results_table['Energy'] = ['0.8']*len(energy_8_recipes) + ['0.99']*len(energy_99_recipes)
    print(results_table.head())

    pfa_kl_recipe = pfa.get_recipe()
    print(PFA.show(pfa_kl_recipe).head())
    print(PFA.show(
        pfa_kl_recipe,
        include_columns=['layer_name', 'original count', 'recommended count']
    ).head())
    print(PFA.show(
        pfa_kl_recipe,
        include_columns=[]
    ).head())

    print("Starting selection. This may take several seconds")
    abs_max_recipes = pfa.get_recipe(unit_strategy=PFA.UnitSelectionStrategy.AbsMax())
    l1_max_recipes = pfa.get_recipe(unit_strategy=PFA.UnitSelectionStrategy.L1Max())
    results_table = PFA.show((abs_max_recipes, l1_max_recipes))
    results_table['strategy'] = ['ABS MAX']*len(abs_max_recipes) + ['L1 MAX']*len(l1_max_recipes)
    print(results_table.head())

    ax = PFA.show(pfa_kl_recipe, vis_type=PFA.VisType.CHART)
    # ---- end of the notebook

    assert isinstance(results_table, pd.DataFrame) and len(results_table) == 2 * len(conv2d_responses)
    assert pfa.failed_responses == []
    assert all(isinstance(r, PFARecipe) for r in pfa_kl_recipe.values())
    assert list(pfa_kl_recipe) == conv2d_responses
    assert all(1 <= r.recommended_output_count <= r.original_output_count for r in pfa_kl_recipe.values())
    # energy 0.99 keeps at least as many units as 0.8, everywhere
    assert all(energy_99_recipes[n].recommended_count >= energy_8_recipes[n].recommended_count for n in conv2d_responses)
    # the default unit strategy is DNIKit's L1Max
    assert {r.units_to_keep for r in pfa_kl_recipe.values()} == {r.units_to_keep for r in l1_max_recipes.values()}
    assert ax.get_ylabel() == "number of units"
    assert pfa.responses["stem.0"] == "stem.0 -> stem.1 -> stem.2"  # read after BatchNorm and ReLU


def test_pfa_cifar_names_and_leader_recipes():
    from moco.bench.bench_pfa_cifar import seed_names
    from moco.compress.pfa import leader_recipes
    from moco.compress.surgery import apply

    torch.manual_seed(0)
    model = create("mobilenet_v1", width_multiplier=0.25).eval()
    names = seed_names(model)
    assert names["stem.0"] == "conv1" and names["features.10.pointwise.0"] == "conv_pw_11"
    assert names["features.0.depthwise.0"] == "conv_dw_1" and len(names) == 27
    images = torch.randn(300, 3, 32, 32)
    pfa = PFA.introspect(PFA.producer(images, model=model, layers=list(names)), batch_size=100, progress=False)
    chosen, dropped = leader_recipes(pfa.get_recipe(), model, images[:1])
    # each depthwise conv is tied to the conv feeding it: only the group's first conv keeps its recipe
    assert set(dropped) == {n for n in names if "depthwise" in n}
    small = apply(model, PFA.keep(chosen), images[:1])
    assert small(images[:2]).shape == (2, 10)
    assert small.features[0].depthwise[0].out_channels == chosen["stem.0"].recommended_count
