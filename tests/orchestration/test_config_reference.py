"""docs/configuration.md is generated from the schema and lists every key of params.yaml."""


def test_configuration_reference_is_up_to_date():
    from pathlib import Path

    from pipeline.orchestration.config_reference import reference_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: run `python -m pipeline config-reference > docs/configuration.md`"
    )


def test_reference_lists_every_key_of_params_yaml():
    import yaml

    from pipeline.core.tracking import flatten
    from pipeline.orchestration.config_reference import reference_markdown

    reference = reference_markdown()
    for key in flatten(yaml.safe_load(open("params.yaml", encoding="utf-8"))):
        if not key.startswith("ingest.file.columns."):
            assert f"`{key}`" in reference, key
