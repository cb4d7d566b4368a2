import numpy as np
import pytest

from stfusion_tf.model.strategy import FusionStrategy

POS = ("B1.L1", "B1.L2", "T1", "B2.L1")


def test_json_round_trip(tmp_path):
    st = FusionStrategy(POS, ("S", "ST", "S+ST", "none"))
    path = str(tmp_path / "s.json")
    st.save(path)
    assert FusionStrategy.load(path) == st
    assert FusionStrategy.from_json(st.to_json()) == st


def test_mask_round_trip_and_codes():
    st = FusionStrategy(POS, ("S", "ST", "S+ST", "none"))
    np.testing.assert_array_equal(st.to_mask(), [[1, 0], [0, 1], [1, 1], [0, 0]])
    assert FusionStrategy.from_mask(POS, st.to_mask()) == st
    assert st.code() == "ST|F|-"
    assert st.counts() == {"S": 1, "ST": 1, "S+ST": 1, "none": 1}
    assert st["T1"] == "S+ST"


def test_bad_unit_names_valid_values():
    with pytest.raises(ValueError, match="valid units: S, ST, S\\+ST, none"):
        FusionStrategy(POS, ("S", "T", "S", "S"))
    with pytest.raises(ValueError, match="4 positions but 3 units"):
        FusionStrategy(POS, ("S", "S", "S"))
    with pytest.raises(ValueError, match="only 0 and 1"):
        FusionStrategy.from_mask(POS, np.full((4, 2), 0.5))


def test_codes_group_backbone_stages():
    st = FusionStrategy(("C2.B1", "C2.B2", "C3.B1", "C4.B1"), ("S+ST", "ST", "S", "S+ST"))
    assert st.code() == "FT|S|F"
