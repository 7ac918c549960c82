"""A misspelt config-group choice on the command line is one line from fvis with a did-you-mean."""

import subprocess
import sys

import pytest

from fvis import cli


def fvis_main(monkeypatch, capsys, *args):
    """Runs the `fvis` command in this process up to Hydra (which must not be reached); returns
    (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fvis", *args])
    monkeypatch.setattr(cli, "_hydra_main", lambda: pytest.fail("the typo reached Hydra"))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, line", [
    (["param=fourierr"], "Unknown param 'fourierr'. Did you mean 'fourier'? Received: param='fourierr'"),
    (["model=resnet50v3"], "Unknown model 'resnet50v3'. Did you mean 'resnet50v2'? Received: model='resnet50v3'"),
    (["experiment=lucidd"], "Unknown experiment 'lucidd'. Did you mean 'lucid'? Received: experiment='lucidd'"),
    (["-m", "steps=1,2", "optimizer=adam,nadamm"],
     "Unknown optimizer 'nadamm'. Did you mean 'nadam' or 'adam'? Received: optimizer='nadamm'"),
])
def test_misspelt_group_choice_is_one_line_with_did_you_mean(monkeypatch, capsys, tmp_path, args, line):
    """The exact line, exit status 2, nothing from Hydra, and no run folder made."""
    monkeypatch.chdir(tmp_path)
    status, err = fvis_main(monkeypatch, capsys, *args)
    assert status == 2 and err == f"fvis: error: {line}\n"
    assert list(tmp_path.iterdir()) == []


def test_group_choice_far_from_every_option_lists_the_options(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    status, err = fvis_main(monkeypatch, capsys, "transform=zzz")
    assert status == 2
    assert err == "fvis: error: Unknown transform 'zzz'. Valid names: 'maco', 'none', 'standard'. Received: transform='zzz'\n"


def test_existing_choices_and_other_keys_pass_the_check():
    """Real choices, sweeps of them, glob sweeps and plain keys are left to Hydra."""
    assert cli.config_group_typo(["param=fourier", "model=tiny", "-m", "optimizer=adam,nadam", "lr=1,5",
                                  "objective=glob(chan*)", "hydra/launcher=joblib", "~experiment"]) is None


def test_typo_through_the_installed_command_is_one_line(tmp_path):
    """The real process: exit status 2 and one stderr line, no Hydra traceback or option list."""
    proc = subprocess.run([sys.executable, "-m", "fvis", "model=tiny", "param=fourierr"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "fvis: error: Unknown param 'fourierr'. Did you mean 'fourier'? Received: param='fourierr'\n"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
