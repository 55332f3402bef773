import pytest

from pipeline.core.config import load_params, params_from_dict
from pipeline.core.errors import ConfigError
from pipeline.orchestration.cli import main


def test_repo_params_yaml_is_valid():
    params = load_params("params.yaml")
    assert params.ingest.source == "synthetic"
    assert params.validate_.min_rows >= 0


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"ingest\.synthetic\.n_interaction: unknown key"):
        params_from_dict({"ingest": {"synthetic": {"n_interaction": 10}}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"features\.min_user_interactions: .*integer"):
        params_from_dict({"features": {"min_user_interactions": "five"}})
    # Strict: a quoted number is not silently coerced.
    with pytest.raises(ConfigError, match=r"seed"):
        params_from_dict({"seed": "42"})


def test_enum_value_is_checked():
    with pytest.raises(ConfigError, match=r"ingest\.source"):
        params_from_dict({"ingest": {"source": "kafka"}})


def test_overrides_parse_yaml_values():
    params = params_from_dict({}, ["ingest.synthetic.n_interactions=20000", "features.min_rating=null", "ingest.source=file"])
    assert params.ingest.synthetic.n_interactions == 20000
    assert params.features.min_rating is None
    assert params.ingest.source == "file"


def test_override_of_unknown_key_fails():
    with pytest.raises(ConfigError, match=r"features\.nope: unknown key"):
        params_from_dict({}, ["features.nope=1"])


def test_override_without_equals_fails():
    with pytest.raises(ConfigError, match="key.sub=value"):
        params_from_dict({}, ["features.min_rating"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_reports_config_error_without_traceback(tmp_path, capsys, caplog):
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest:\n  source: synthetic\n  bogus: 1\n")
    code = main(["show-params", "--params", str(bad)])
    assert code == 2
    assert "ingest.bogus: unknown key" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_params_yaml_states_exactly_the_schema_defaults():
    """One copy of every default: the schema's. params.yaml writes the same values out (with comments),
    so a run from params.yaml and a config built in code (`params_from_dict({})`) cannot drift apart."""
    from pathlib import Path

    from pipeline.core.config import load_params, params_from_dict

    root = Path(__file__).resolve().parents[2]
    from_yaml = load_params(root / "params.yaml").model_dump(mode="json", by_alias=True)
    from_schema = params_from_dict({}).model_dump(mode="json", by_alias=True)
    assert from_yaml == from_schema



@pytest.mark.parametrize(("ks", "problem"), [([0], "greater than or equal to 1"), ([], "at least 1 item"),
                                             ([10, -5], "greater than or equal to 1")])
def test_evaluate_ks_are_checked_at_load_time(ks, problem):
    with pytest.raises(ConfigError, match=rf"evaluate\.ks.*{problem}"):
        params_from_dict({}, [f"evaluate.ks={ks}"])


@pytest.mark.parametrize("name", [".", "..", "...", "a/b", "", "../x"])
def test_run_name_must_name_a_directory_of_its_own(name):
    with pytest.raises(ConfigError, match=r"train\.run_name"):
        params_from_dict({"train": {"run_name": name}})


def test_run_names_with_dots_inside_are_fine():
    assert params_from_dict({}, ["train.run_name=v1.2"]).train.run_name == "v1.2"
    assert params_from_dict({}, ["train.run_name=.hidden"]).train.run_name == ".hidden"
