"""The real configs against the paper's and the authors' recipe, kept here so a drift is caught.

Sources (reference digest §4, §2): the paper §4.1 and Tables 1, 3, 5; the authors' code
(``main.py``, ``args.py``) and launch scripts.  Epoch numbers of the v-DropPath phase are the
paper's, counted from the end of the warm-up; the configs count from the start of the run.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Per dataset: length-scale prior k, initial lr, lr steps (x0.1, epochs of the v-DropPath
#: phase), its epochs, batch, frames (paper Table 1: 16; the authors' scripts mostly 32),
#: pretraining (paper Tables 1/3/5: "Im"; Kinetics-400 from scratch, Table 4).
PAPER = {
    "ssv1": {"k": 250, "lr": 0.005, "steps": (40, 60, 80), "epochs": 90, "batch": 32,
             "frames": 16, "init": "imagenet", "flip": False},
    "ssv2": {"k": 50, "lr": 0.005, "steps": (40, 60, 80), "epochs": 90, "batch": 32,
             "frames": 16, "init": "imagenet", "flip": False},
    "ucf101": {"k": 50, "lr": 0.005, "steps": (40, 60, 80), "epochs": 90, "batch": 32,
               "frames": 16, "init": "imagenet", "flip": True},
    "k400": {"k": 10, "lr": 0.01, "steps": (40, 80), "epochs": 110, "batch": 64,
             "frames": 16, "init": "none", "flip": True},
}
#: The authors' warm-up launch (--dropout=0.5 --epochs=50 --lr_steps 30 40, default weight
#: decay 5e-4 in PyTorch's coupled SGD form, momentum 0.9) and v-DropPath launch
#: (--dropout=0.0 --weight_decay=0.0, one SGD parameter group, code-form regulariser).
AUTHORS = {"warmup_epochs": 50, "warmup_steps": (30, 40), "warmup_dropout": 0.5,
           "warmup_weight_decay_coupled": 5e-4, "momentum": 0.9, "weight_decay": 0.0,
           "optimizer": "sgd", "gate_optimizer": "shared", "weight_term": "norm",
           "regularizer": "code", "temperature": 0.2, "init_drop_rate": 0.1,
           "crop": 224, "eval_side": 256, "selection_views": (1, 1), "test_views": (2, 1)}


@pytest.fixture
def parse():
    from stfusion_tf import flags as cli
    from stfusion_tf import main  # noqa: F401  (defines the mode flags)

    def _parse(*args):
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["main", *args])
        return cli
    yield _parse
    cli.FLAGS.unparse_flags()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_real_config_follows_the_paper_and_the_authors(parse, name):
    path = os.path.join(ROOT, "configs", f"{name}.flags")
    cli = parse(f"--flagfile={path}")
    paper, F = PAPER[name], cli.FLAGS
    train, gate, icfg = cli.train_config(), cli.gate_config(), cli.input_config()
    tcfg, acfg = cli.template_config(), cli.analysis_config()
    w = AUTHORS["warmup_epochs"]
    # Paper §4.1: the v-DropPath phase.
    assert gate.length_scale == paper["k"] and train.learning_rate == paper["lr"]
    assert train.epochs - train.warmup_epochs == paper["epochs"]
    assert tuple(e - w for e in train.lr_steps) == paper["steps"]
    assert icfg.batch_size == paper["batch"] and icfg.num_frames == paper["frames"]
    assert F.init_weights == paper["init"] and F.preset == "densenet121"
    assert icfg.flip == paper["flip"]
    # The authors' two launches: warm-up, then a restarted optimizer and schedule.
    assert train.warmup_epochs == w and train.restart_at_switch
    assert train.warmup_lr_steps == AUTHORS["warmup_steps"]
    assert train.warmup_learning_rate is None  # the v-DropPath phase's lr (not in the scripts)
    assert tcfg.dropout == AUTHORS["warmup_dropout"]
    coupled, m = AUTHORS["warmup_weight_decay_coupled"], AUTHORS["momentum"]
    assert train.momentum == m and train.warmup_weight_decay == pytest.approx(coupled / (1 - m))
    assert train.weight_decay == AUTHORS["weight_decay"]
    assert (train.optimizer, train.gate_optimizer) == (AUTHORS["optimizer"],
                                                        AUTHORS["gate_optimizer"])
    assert (gate.weight_term, gate.regularizer, gate.temperature, gate.init_drop_rate) == (
        AUTHORS["weight_term"], AUTHORS["regularizer"], AUTHORS["temperature"],
        AUTHORS["init_drop_rate"])
    assert not gate.rescale
    # Views: 224 training crops; the authors' selection and test on the full 256x256 frame.
    assert icfg.crop_size == AUTHORS["crop"] and icfg.eval_short_side == AUTHORS["eval_side"]
    assert (icfg.num_clips, icfg.num_crops, icfg.eval_crop) == AUTHORS["test_views"] + (256,)
    assert acfg.selection_protocol == "authors"
    from stfusion_tf.data import pipeline
    sel = pipeline.with_protocol(icfg, acfg.selection_protocol)
    assert (sel.num_clips, sel.num_crops) == AUTHORS["selection_views"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_generalisation_command_reproduces_table_2_with_densenet121(name):
    text = open(os.path.join(ROOT, "configs", f"{name}.flags")).read()
    cmd = re.search(r"--backbones=(\S+)", text).group(1).split(",")
    assert cmd[0] == "densenet121" and "resnet50" in cmd


def test_a_custom_view_flag_with_a_named_protocol_is_a_user_error(parse):
    from stfusion_tf.errors import UserError
    cli = parse("--eval_protocol=paper", "--num_clips=3")
    with pytest.raises(UserError, match="--num_clips is a setting of --eval_protocol=custom"):
        cli.input_config()
    cli = parse("--warmup_lr_steps=3")
    with pytest.raises(UserError, match="--warmup_lr_steps needs --restart_at_switch"):
        cli.train_config()
    cli = parse("--init_weights=imagenet", "--preset=tiny")
    with pytest.raises(UserError, match="needs --preset=densenet121"):
        cli.check()


def test_docs_have_the_recipe_table():
    section = open(os.path.join(ROOT, "docs", "recipe.md")).read()
    assert "docs/recipe.md" in open(os.path.join(ROOT, "README.md")).read()
    for needle in ("| paper | authors' code | this project", "inflate_branches",
                   "weight decay", "restart", "eval_protocol", "scripts' 32"):
        assert needle in section, needle


def test_searched_templates_take_their_own_weight_term(parse):
    cli = parse("--weight_term=prior")
    assert cli.gate_config(searched=True) == cli.gate_config()  # default: the run's
    path = os.path.join(ROOT, "configs", "synthetic_appearance.flags")
    cli = parse(f"--flagfile={path}")
    assert cli.gate_config().weight_term == "prior"
    assert cli.gate_config(searched=True).weight_term == "compute"
    assert cli.gate_config(5, searched=True).dataset_size == 5
    cli = parse(f"--flagfile={path}", "--searched_weight_term=norm")
    assert cli.gate_config(searched=True).weight_term == "norm"


def test_a_searched_run_says_which_weight_term_it_was_searched_with(tmp_path):
    from stfusion_tf import modes
    run = tmp_path / "searched" / "resnet_tiny"
    assert modes.searched_weight_term(str(run), "prior") == "prior"  # made before the file
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / modes.SEARCHED_WITH).write_text('{"weight_term": "compute"}')
    assert modes.searched_weight_term(str(run), "prior") == "compute"
    (run / "analysis" / modes.SEARCHED_WITH).write_text('{"weight_te')  # torn: the default
    assert modes.searched_weight_term(str(run), "prior") == "prior"
