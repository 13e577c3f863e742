"""A regular install puts kt_patch.pth in site-packages, and that file activates kt_patch only under KT_ENABLE.

The editable install of the README's commands is covered by test_patch.py's launcher tests, which need its .pth.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_install_ships_the_activation_pth(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), REPO], check=True, capture_output=True, text=True)
    assert (target / "kt_patch.pth").read_text() == open(os.path.join(REPO, "kt_patch", "kt_patch.pth")).read()
    probe = f"import site, sys; site.addsitedir({str(target)!r}); print('kt_patch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "KT_ENABLE"}
    off = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", probe], env={**env, "KT_ENABLE": "1"}, cwd=tmp_path,
                        capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stderr
    assert on.stdout.strip() == "True", on.stderr
