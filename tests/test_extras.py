from deepwhale.extras import describe_import_error


def test_missing_module_names_its_extra():
    e = ModuleNotFoundError("No module named 'apache_beam'", name="apache_beam")
    assert 'pip install -e ".[data]"' in describe_import_error(e)
    e = ModuleNotFoundError("No module named 'peft.tuners'", name="peft.tuners")
    assert "train extra" in describe_import_error(e)
    assert describe_import_error(ModuleNotFoundError("x", name="unknown_mod")) == "x"
    assert describe_import_error(ValueError("bad")) == "bad"


def test_cli_error_keeps_brackets(capsys):
    import pytest
    import typer

    from deepwhale.cli import _fail

    with pytest.raises(typer.Exit):
        _fail(ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn"))
    assert ".[serve]" in capsys.readouterr().err
