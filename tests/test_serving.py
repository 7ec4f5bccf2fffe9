"""`visincontext serve`: transformers' OpenAI-compatible server on a saved folder, talked to as a user would, with the
`openai` client. The answers must be exactly `model.generate`'s (greedy) on the same image, context and question."""

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from visincontext.hub import prepare_repo
from visincontext.serving import messages_to_conversation, parse_args
from visincontext.testing import open_gates, tiny_model, tiny_processor

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

pytestmark = pytest.mark.slow  # starts a server process (and its model process)

MAX_TOKENS = 8
CONTEXT = "The vault code is 4417. " * 5
QUESTION = "What is the code?"


def png_data_url(color=(200, 30, 60)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(context: str | None = CONTEXT) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": QUESTION}]
    if context is not None:
        content.insert(0, {"type": "context", "text": context})
    return [{"role": "user", "content": content}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A prepare_repo folder whose greedy answers depend on the pages (gates open) and decode losslessly: only
    printable ASCII may be generated (`suppress_tokens` in its generation config), so an answer's text names its
    tokens."""
    processor = tiny_processor()
    model = open_gates(tiny_model(seed=3, initializer_range=0.5), 1.0)
    printable = {processor.tokenizer(chr(c), add_special_tokens=False).input_ids[0] for c in range(32, 127)}
    vocab = model.get_output_embeddings().weight.shape[0]
    model.generation_config.suppress_tokens = [i for i in range(vocab) if i not in printable]
    return prepare_repo(model, processor, tmp_path_factory.mktemp("serve") / "repo")


@contextlib.contextmanager
def serving(command, log: Path, base_url: str, **popen):
    """Runs the server `command` until `base_url/health` answers, yields, then stops it."""
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as health:
                    if health.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health in 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """`visincontext serve FOLDER` on a free localhost port; stopped at teardown."""
    port = free_port()
    command = [sys.executable, "-m", "visincontext", "serve", str(folder), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    base_url = f"http://127.0.0.1:{port}"
    with serving(command, tmp_path_factory.mktemp("serve-log") / "server.log", base_url):
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(folder):
    """What `model.generate` answers, greedy, on the same inputs the server gets (the same folder, loaded here)."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def answer(context):
        inputs = processor.apply_chat_template(
            messages_to_conversation(chat_messages(context)),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        text = processor.decode(tokens, skip_special_tokens=True)
        # the text names the tokens: what the server's text matches, its tokens match
        assert processor.tokenizer(text, add_special_tokens=False).input_ids == tokens
        return text, tokens

    return answer


def test_chat_answers_are_generates_tokens(client, folder, reference):
    expected, tokens = reference(CONTEXT)
    assert expected != reference(None)[0], "the pages must change the answer, or the test cannot see them dropped"

    reply = client.chat.completions.create(
        model=str(folder), messages=chat_messages(), max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == len(tokens)

    stream = client.chat.completions.create(
        model=str(folder), messages=chat_messages(), max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected

    # the Responses API: the same items under its names
    responses_input = [
        {
            "role": "user",
            "content": [
                {"type": "context", "text": CONTEXT},
                {"type": "input_image", "image_url": png_data_url()},
                {"type": "input_text", "text": QUESTION},
            ],
        }
    ]
    response = client.responses.create(
        model=str(folder), input=responses_input, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert response.output_text == expected

    without_context = client.chat.completions.create(
        model=str(folder), messages=chat_messages(None), max_tokens=MAX_TOKENS, temperature=0
    )
    assert without_context.choices[0].message.content == reference(None)[0]


@pytest.mark.parametrize(
    "content, extra, named",
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], {}, "content[0].image_url"),
        ([{"type": "image_url", "image_url": {"url": "/etc/hostname"}}], {}, "content[0].image_url"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], {}, "unknown content type"),
        ([{"type": "context", "text": "word " * 20000}], {}, "context"),
        ([{"type": "context", "text": 7}], {}, "content[0].text"),
        ("hello", {"chat_template_kwargs": {"context": "lost"}}, "chat_template_kwargs.context"),
        ("hello", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ],
    ids=[
        "unreadable-image",
        "server-path",
        "unknown-type",
        "context-over-max-pages",
        "context-not-text",
        "kwargs",
        "tools",
    ],
)
def test_bad_requests_are_400_naming_the_problem_and_the_server_goes_on(
    client, folder, reference, content, extra, named
):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=str(folder), messages=[{"role": "user", "content": content}], max_tokens=2, extra_body=extra
        )
    assert named in caught.value.response.json()["detail"]
    reply = client.chat.completions.create(
        model=str(folder), messages=chat_messages(), max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == reference(CONTEXT)[0]


@pytest.mark.parametrize(
    "argv, named",
    [(["repo", "--port", "70000"], "--port"), (["repo", "--chat-template-kwargs", "[1]"], "--chat-template-kwargs")],
)
def test_bad_options_exit_with_one_line_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2 and named in capsys.readouterr().err


def test_a_folder_that_does_not_load_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "visincontext", "serve", str(tmp_path / "missing"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("visincontext serve: error:")


def test_the_readme_serving_commands_run_as_written(folder, tmp_path):
    """The README's Serving block: its `visincontext serve` line (on the folder the quickstart writes, here the test's
    folder in its place, and on a free port), then its `curl` line."""
    block = re.search(r"## Serving.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    serve_line, curl_line = block.strip().splitlines()
    assert serve_line.startswith("visincontext serve outputs/quickstart/hub") and curl_line.startswith("curl ")
    (tmp_path / "outputs" / "quickstart").mkdir(parents=True)
    (tmp_path / "outputs" / "quickstart" / "hub").symlink_to(folder)
    port = str(free_port())
    bin_dir = str(Path(sys.executable).parent)  # where pip put the `visincontext` command
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"])
    with serving(
        ["bash", "-c", "exec " + serve_line.replace("8000", port)],
        tmp_path / "server.log",
        f"http://localhost:{port}",
        cwd=tmp_path,
        env=env,
    ):
        result = subprocess.run(
            ["bash", "-c", curl_line.replace("8000", port)], capture_output=True, text=True, timeout=120, check=True
        )
        answer = json.loads(result.stdout)
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 16
        assert isinstance(answer["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_a_data_url_gives_the_pixels_transformers_load_image_gives(image_format):
    from transformers.image_utils import load_image

    from visincontext.serving import image_from_url

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotated 90 degrees; both must turn it upright
    pixels = torch.randint(0, 256, (30, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(buffer, format=image_format, exif=exif)
    url = f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
    ours, theirs = image_from_url(url, "image_url"), load_image(url)
    assert ours.size == theirs.size == (30, 40) and ours.tobytes() == theirs.tobytes()
