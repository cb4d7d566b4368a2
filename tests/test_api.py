"""The notebook API: ``import stfusion_tf as sf`` and docs/api.md's example, run as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    text = open(os.path.join(ROOT, "docs", "api.md")).read()
    section = text[text.index("## Example"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_is_light_and_names_resolve():
    code = ("import sys, stfusion_tf as sf; assert 'tensorflow' not in sys.modules; "
            "names = [sf.FusionUnit, sf.VariationalDropPath, sf.FusionStrategy, sf.build_template, "
            "sf.build_backbone, sf.load_run, sf.marginals, sf.search, sf.GateConfig, sf.BlockKeep]; "
            "print(len(sf.presets()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == 11


def test_build_backbone_from_a_spec_and_bad_specs():
    import stfusion_tf as sf
    net = sf.build_backbone("resnet_tiny", "S+ST,S+ST,ST,none", 4)
    assert net.strategy.code() == "F|F|T|-" and net.count_params() > 0
    with pytest.raises(sf.UserError, match="'none'.* at M2.B1"):
        sf.build_backbone("mobilenetv2_tiny", "S,none,S,S,S,S,S", 4)
    with pytest.raises(sf.UserError, match="valid presets: densenet121, small, tiny, resnet50"):
        sf.build_template("vgg16", 4)


@pytest.mark.slow
def test_docs_example_trains_a_users_network_as_a_template(capsys):
    namespace = {}
    exec(compile(_example(), "docs/api.md", "exec"), namespace)
    out = capsys.readouterr().out
    rows = namespace["sf"].marginals(namespace["model"])
    assert [r["position"] for r in rows] == ["unit1", "unit2", "unit3"]
    assert all(abs(sum(r[u] for u in ("S", "ST", "S+ST", "none")) - 1) < 1e-6 for r in rows)
    result = namespace["result"]
    assert result.opt.positions == ("unit1", "unit2", "unit3") and len(result.rows) == 12
    assert result.rows[0]["clip_top1"] >= result.rows[-1]["clip_top1"]
    assert "Opt " in out and "unit3" in out
    # The drop rates left their prior 0.1 (the data spoke), and training learned the task.
    rates = namespace["sf"].TemplateGates(namespace["model"]).drop_rates()
    assert abs(rates - 0.1).max() > 0.02
    assert result.rows[0]["clip_top1"] > 0.4  # 4 classes: chance 0.25
