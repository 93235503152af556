"""Images end to end against transformers, on both backends: the vision graph (export/vision.py) against its own
vision tower and embedder (`get_image_features`) on images of several sizes and aspect ratios preprocessed by
runtime/images.py, through a held-out tower (grouped KV heads, two layers, standardized features) and the demo's;
and generation with images in the prompt against its `generate` with the same noise."""

import copy
import json
import threading
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from dg_export import export
from dg_export.builtin import GENERATION_CONFIG, TEXT_CONFIG, TINY_VISION_CONFIG, write_tokenizer
from dg_export.plan import tower_sizes
from dg_export.reference import generate_with_noise
from dg_export.checkpoint import Checkpoint
from dg_export.source import load_config
from dg_export.vision import build_vision_model
from dg_export.weights import WEIGHTS_FILE, Weights
from dg_runtime import Chat, DiffusionGemma, NoiseSource, Settings, UserError
from dg_runtime.backends import OnnxRuntimeGraph, OpenVinoGraph
from dg_runtime.images import ImageSpec, patches
from test_serve_page import browser  # noqa: F401  (the headless browser fixture)

TOWERS = {
    "demo": TINY_VISION_CONFIG,
    "gqa-standardized": {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                         "patch_size": 4, "pooling_kernel_size": 3, "position_embedding_size": 64,
                         "standardize": True},
}
SIZES = [(50, 37), (20, 90), (64, 64), (90, 31)]  # grids within the demo tower's 64-entry position table


def vision_checkpoint(folder, tower: dict, **config) -> DiffusionGemmaForBlockDiffusion:
    """A seeded checkpoint with this vision tower, its weights large enough that a wrong op shows (the default
    init is nearly zero); returns transformers' model of it."""
    text = {**TEXT_CONFIG, **config.pop("text", {})}
    model_config = DiffusionGemmaConfig(text_config=text, vision_config=tower, canvas_length=32, **config)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(model_config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vision" in name:
                parameter.normal_(0.0, 0.3)
        model.get_input_embeddings().weight.normal_(0.0, 0.3)  # peaked outputs: no float near-ties
        for name, buffer in model.named_buffers():
            if "std_bias" in name:
                buffer.normal_(0.0, 0.5)
            elif "std_scale" in name:
                buffer.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()  # with its generation config


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request, tmp_path_factory):
    """(transformers' model, {backend: vision graph session}, ImageSpec) for a checkpoint with this vision tower."""
    root = tmp_path_factory.mktemp(request.param)
    model = vision_checkpoint(root / "checkpoint", TOWERS[request.param])
    loaded = load_config(root / "checkpoint")
    weights = Weights(root / WEIGHTS_FILE, Checkpoint(root / "checkpoint"))
    try:
        graph = build_vision_model(loaded, weights)
        openvino_graph = build_vision_model(loaded, weights, "openvino")
    finally:
        weights.close()
    onnx.save(graph, str(root / "vision.onnx"))
    from dg_export import openvino_graphs

    openvino_graphs.convert(openvino_graph, root / "vision.xml", root / WEIGHTS_FILE)
    sessions = {"onnxruntime": OnnxRuntimeGraph(root / "vision.onnx", None),
                "openvino": OpenVinoGraph(root / "vision.xml", root / WEIGHTS_FILE, "CPU", None, "f32", None)}
    vision = model.config.vision_config
    return model, sessions, ImageSpec(vision.patch_size, vision.pooling_kernel_size, 70)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_image_features_equal_transformers(tower, backend):
    model, sessions, spec = tower
    for height, width in SIZES:
        image = Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
        values, positions = patches(image, spec)
        (features,) = sessions[backend].run(["image_features"], {"pixel_values": values[None],
                                                                 "pixel_positions": positions[None]})
        with torch.no_grad():
            expected = model.model.encoder.get_image_features(torch.from_numpy(values[None]),
                                                              torch.from_numpy(positions[None])).pooler_output.numpy()
        assert features.shape == (1, len(values) // spec.pooling_kernel ** 2, model.config.text_config.hidden_size)
        assert np.abs(expected).max() > 1.0  # features of some size: a wrong op would show
        np.testing.assert_allclose(features[0], expected, atol=2e-5, rtol=1e-4)


# image tokens inside the byte-level tokenizer's vocabulary (261 ids used of 264)
IMAGE_IDS = {"boi_token_id": 261, "image_token_id": 262, "eoi_token_id": 263}

def random_picture(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def with_images(tmp_path_factory):
    """(transformers' model, the artifact) of a checkpoint whose image tokens see each other (past the sliding
    window: 63 image tokens, window 64 less the text around them) and whose processor takes 70 tokens an image."""
    root = tmp_path_factory.mktemp("with-images")
    model = vision_checkpoint(root / "checkpoint", TOWERS["gqa-standardized"],
                              text={"use_bidirectional_attention": "vision", "sliding_window": 24}, **IMAGE_IDS)
    (root / "checkpoint" / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": 70}))
    add_image_tokens(root / "checkpoint")
    return model, export(root / "checkpoint", root / "images.dg", formats=["onnx", "openvino"])


# Gemma 4's way: the template writes one image token per image part; the processor expands it
IMAGE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def add_image_tokens(folder):
    """The byte-level tokenizer with Gemma 4's image tokens (ids 261-263) and a template that places images."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|image>", "<|image|>", "<image|>"])
    assert tokenizer.token_to_id("<|image|>") == IMAGE_IDS["image_token_id"]
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": IMAGE_TEMPLATE}))


def processed(images: list, spec: ImageSpec) -> dict:
    """transformers' processor output for `images` (pixels padded to its patch budget)."""
    processor = Gemma4ImageProcessorPil(patch_size=spec.patch_size, pooling_kernel_size=spec.pooling_kernel,
                                        max_soft_tokens=spec.max_soft_tokens)
    out = processor(images=images, return_tensors="np")
    return {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_generation_with_images_equals_transformers(with_images, backend):
    model, artifact = with_images
    runtime = DiffusionGemma(artifact, backend=backend)
    assert runtime.manifest["modalities"] == ["text", "image"] and runtime.vision["max_soft_tokens"] == 70
    spec = ImageSpec(4, 3, 70)
    settings = Settings(max_new_tokens=64, max_denoising_steps=8, entropy_bound=0.5, t_max=0.3, t_min=0.1)
    changed = 0
    for seed in range(4):
        pictures = [random_picture(50 + 20 * seed, 37, seed), random_picture(20, 90 - 10 * seed, seed + 10)][: 1 + seed % 2]
        counts = [len(patches(p, spec)[0]) // 9 for p in pictures]
        rng = np.random.default_rng(seed)
        prompt = [2, *rng.integers(5, 255, 3 + seed)]
        for count in counts:  # text, an image, text, (another image, text)
            prompt += [*runtime.image_ids(count), *rng.integers(5, 255, 4)]
        prompt = np.array([prompt])
        expected, _ = generate_with_noise(model, prompt, settings, NoiseSource(seed), **processed(pictures, spec),
                                          mm_token_type_ids=(prompt == IMAGE_IDS["image_token_id"]).astype(np.int64))
        ours = runtime.generate(prompt, settings=settings, noise=NoiseSource(seed), images=pictures).tokens
        assert np.array_equal(ours, expected[:, : settings.max_new_tokens]), seed
        other = [random_picture(p.height, p.width, seed + 100) for p in pictures]  # same size, other pixels
        changed += not np.array_equal(runtime.generate(prompt, settings=settings, noise=NoiseSource(seed),
                                                       images=other).tokens, ours)
    assert changed >= 3  # the image is read: other pixels, another answer


def test_images_must_fit_their_tokens(with_images):
    runtime = DiffusionGemma(with_images[1])
    picture = random_picture(50, 37, 0)
    with pytest.raises(UserError, match="runs of \\[5\\], the images take \\[63\\]"):
        runtime.generate([[2, *runtime.image_ids(5), 9]], images=[picture])


def test_a_text_only_export_says_it_takes_no_images(with_images, tmp_path):
    model, artifact = with_images
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert {row["graph"] for row in manifest["validation"]["results"]} >= {"vision"}  # the exporter checked it
    text_only = export(artifact.parent / "checkpoint", tmp_path / "text.dg", formats=["onnx"], text_only=True,
                       validation=None)
    runtime = DiffusionGemma(text_only)
    assert runtime.manifest["modalities"] == ["text"] and not (text_only / "vision.onnx").exists()
    with pytest.raises(UserError, match="takes no images"):
        runtime.generate([[2, 9, 9]], images=[random_picture(20, 20, 0)])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_text_with_images_places_them_as_the_processor_does(with_images, backend):
    model, artifact = with_images
    runtime = DiffusionGemma(artifact, backend=backend)
    picture = random_picture(40, 60, 3)
    count = runtime.image_token_counts([picture])[0]
    settings = Settings(max_new_tokens=64, max_denoising_steps=8, entropy_bound=0.5, t_max=0.3, t_min=0.1)
    # what transformers' processor makes of the template's one image token: begin, the image's tokens, end
    codec = runtime.text
    ids = [*codec.encode("<bos><start_of_turn>user\n"), *runtime.image_ids(count),
           *codec.encode("what is this?<end_of_turn>\n<start_of_turn>model\n")]
    assert runtime.prompt_ids("what is this?", images=[picture]) == ids
    expected, _ = generate_with_noise(model, np.array([ids]), settings, NoiseSource(5),
                                      **processed([picture], ImageSpec(4, 3, 70)),
                                      mm_token_type_ids=(np.array([ids]) == IMAGE_IDS["image_token_id"]).astype(np.int64))
    reply = runtime.generate_text("what is this?", images=[picture], settings=settings, seed=5)
    assert reply == codec.decode(runtime.reply(expected[0, : settings.max_new_tokens]))
    chat = Chat(runtime, settings=settings)
    assert chat.send("what is this?", images=[picture], seed=5) == reply
    assert chat.messages[0]["content"][0] == {"type": "image"} and chat.send("and now?", seed=6) is not None


def test_a_chat_restored_with_images_encodes_them(with_images):
    """Chat(messages=...) with image parts: the history's images go in with the first new turn, where the
    template placed them."""
    runtime = DiffusionGemma(with_images[1])
    picture = random_picture(50, 30, 8)
    settings = Settings(max_new_tokens=32, max_denoising_steps=6, entropy_bound=0.5, t_max=0.3, t_min=0.1)
    history = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "what?"}]},
               {"role": "assistant", "content": "a picture"}]
    chat = Chat(runtime, settings=settings, messages=history)
    as_templated = [{**history[0], "content": [{"type": "image"}, history[0]["content"][1]]}, history[1],
                    {"role": "user", "content": "and now?"}]
    opened = runtime.open_images([picture])
    ids = runtime.place_images(runtime.text.chat_ids(as_templated), opened)
    expected = runtime.generate([ids], settings=settings, seed=6, images=opened).tokens[0]
    assert chat.send("and now?", seed=6) == runtime.text.decode(runtime.reply(expected))
    assert chat.messages[0] == as_templated[0] and chat.send("and then?", seed=7) is not None
    with pytest.raises(UserError, match=r"messages\[0\].content\[0\] must be"):
        Chat(runtime, messages=[{"role": "user", "content": [{"type": "image"}]}])  # an image part with no image


def test_a_template_without_images_is_said(with_images):
    runtime = DiffusionGemma(with_images[1])
    runtime.text.template = runtime.text.template.environment.from_string(
        "{% for message in messages %}{{ message['content'] }}{% endfor %}")  # one that ignores image parts
    with pytest.raises(UserError, match="placed 0 image\\(s\\) for 1 given"):
        runtime.generate_text("hi", images=[random_picture(20, 20, 1)])


def test_the_quality_report_places_its_picture_where_the_template_cannot(with_images):
    from dg_quantize.quality import prompt_ids, sample_picture

    runtime = DiffusionGemma(with_images[1])
    picture = runtime.open_images([sample_picture(0)])
    assert prompt_ids(runtime, "hi", picture) == runtime.prompt_ids("hi", images=picture)
    runtime.text.template = runtime.text.template.environment.from_string(
        "{% for message in messages %}{{ message['content'] }}{% endfor %}")  # one that ignores image parts
    count = runtime.image_token_counts(picture)[0]
    assert prompt_ids(runtime, "hi", picture) == [*runtime.image_ids(count), *runtime.prompt_ids("hi")]


def test_dg_run_takes_images(with_images, tmp_path):
    import subprocess
    import sys

    artifact = with_images[1]
    picture = tmp_path / "picture.png"
    random_picture(40, 60, 3).save(picture)
    runtime = DiffusionGemma(artifact)
    expected = runtime.generate_text("what is this?", images=[picture], seed=2)
    run = [sys.executable, "-m", "dg_runtime.cli", str(artifact), "-p", "what is this?", "-s", "2", "--json"]
    result = subprocess.run([*run, "--image", str(picture)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == expected
    (tmp_path / "notes.txt").write_text("not a picture")
    for bad, message in ((tmp_path / "notes.txt", "is not an image Pillow can read"),
                         (tmp_path / "missing.png", "no such file")):
        result = subprocess.run([*run, "--image", str(bad)], capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_dg_serve_takes_image_url_parts(with_images, tmp_path):
    from openai import BadRequestError, OpenAI

    from conftest import serving
    from test_images import BAD, encoded

    artifact = with_images[1]
    runtime = DiffusionGemma(artifact)
    picture = random_picture(40, 60, 3)
    expected = runtime.generate_text("what is this?", images=[picture], seed=4)
    with serving(runtime) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")

        def ask(image_url: str, seed: int = 4):
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "what is this?"}]
            return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                                  seed=seed).choices[0].message.content

        assert ask(data_url(encoded(picture, "PNG"))) == expected
        assert ask(data_url(encoded(picture, "PNG"))) == expected  # the same again
        # a later turn resends the picture: its tokens come from the prefix cache, the answer is a cold run's
        first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(encoded(
            picture, "PNG"))}}, {"type": "text", "text": "what is this?"}]}]
        for image, cached in ((picture, True), (random_picture(40, 60, 9), False)):  # same size, other pixels
            second = [{**first[0], "content": [{"type": "image_url", "image_url": {"url": data_url(encoded(
                image, "PNG"))}}, first[0]["content"][1]]}, {"role": "assistant", "content": expected},
                      {"role": "user", "content": "and now?"}]
            answer = client.chat.completions.create(model="demo", messages=second, seed=5)
            history = [{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": "what is this?"}]}, second[1]]
            assert answer.choices[0].message.content == Chat(runtime, messages=history).send("and now?", seed=5)
            assert answer.usage.prompt_tokens_details.cached_tokens == (
                len(runtime.prompt_ids("what is this?", images=[image])) if cached else 0)
        for case, (data, message) in BAD.items():
            with pytest.raises(BadRequestError, match=message):
                ask(data_url(data))
        with pytest.raises(BadRequestError, match="does not fetch image URLs"):
            ask("https://example.com/cat.png")
    with serving(runtime, image_urls=True) as url, serving_files({"/cat.png": encoded(picture, "PNG"),
                                                                 "/big.png": b"x" * (33 << 20),
                                                                 "/ftp.png": "ftp://127.0.0.1/cat.png"}) as files:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert ask(f"{files}/cat.png") == expected
        for path, message in (("/missing.png", "could not fetch .*Not Found"), ("/big.png", "is over 32 MB"),
                              ("/ftp.png", "could not fetch .*Found")):  # a redirect off http(s) is not followed
            with pytest.raises(BadRequestError, match=message):
                ask(files + path)
    text_only = export(artifact.parent / "checkpoint", tmp_path / "text.dg", formats=["onnx"], text_only=True,
                       validation=None)
    with serving(DiffusionGemma(text_only)) as url:
        with pytest.raises(BadRequestError, match="takes no images"):
            OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
                model="demo", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(encoded(picture, "PNG"))}}]}])


@contextmanager
def serving_files(files: dict):
    """A local HTTP server answering GET for these paths (bytes, or a URL to redirect to); yields its base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # bytes are the body, a string is where to go instead
            found = files.get(self.path)
            self.send_response(200 if isinstance(found, bytes) else 302 if found else 404)
            if isinstance(found, str):
                self.send_header("Location", found)
            body = found if isinstance(found, bytes) else b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_page_sends_an_image(with_images, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import serving

    runtime = DiffusionGemma(with_images[1])
    picture = tmp_path / "picture.png"
    random_picture(40, 60, 3).save(picture)
    with serving(runtime) as base:
        browser.get(base)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "images-label").is_displayed())
        browser.find_element(By.ID, "images").send_keys(str(picture))
        browser.find_element(By.ID, "prompt").send_keys("what is this?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "true")
        # textContent: the random model's reply has control characters that .text would fold
        assert browser.find_element(By.ID, "answer").get_attribute("textContent") == runtime.generate_text(
            "what is this?", images=[picture], seed=0)


def test_more_images_than_the_context_holds_is_said(with_images):
    from dg_runtime import PromptTooLong

    runtime = DiffusionGemma(with_images[1])
    pictures = [random_picture(40, 60, seed) for seed in range(runtime.max_positions // 60)]
    with pytest.raises(PromptTooLong, match="shorten the prompt"):
        runtime.generate_text("what are these?", images=pictures)


def test_by_layer_validation_checks_the_vision_graph(with_images, tmp_path):
    artifact = export(with_images[1].parent / "checkpoint", tmp_path / "by-layer.dg", formats=["onnx", "openvino"],
                      validation="by-layer")
    rows = json.loads((artifact / "manifest.json").read_text())["validation"]["results"]
    checked = {row["graph"] for row in rows if row["graph"].startswith("vision.")}
    assert checked == {"vision.patch_embedder", "vision.encoder.layers.0", "vision.encoder.layers.1",
                       "vision.pooler+embed_vision"}
    assert all(row["ok"] for row in rows)


def test_every_recipe_keeps_the_tower_at_fp32_unless_asked():
    """The recipes quantize the text path only; --vision-weight-format int8 quantizes the tower's matrices, not its
    position table (looked up, not multiplied)."""
    from dg_export.recipes import available, load_recipe
    from dg_quantize.roles import Precision

    matrix, table = ("model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight", (64, 32)), \
        ("model.encoder.vision_tower.patch_embedder.position_embedding_table", (2, 64, 32))
    for name in available():
        weights = load_recipe(name)["weights"]
        assert Precision(weights).scheme(*matrix).format == Precision(weights).scheme(*table).format == "fp32"
        assert Precision(weights, vision="int8").scheme(*matrix).format == "int8"
        assert Precision(weights, vision="int8").scheme(*table).format == "fp32"


def int8_tower_features(model, pictures: list, spec: ImageSpec) -> np.ndarray:
    """transformers' features of `pictures` with the tower's matrices rounded to int8 per output channel (what the
    int8 tower stores; the activations stay float)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if "vision" in name and parameter.ndim == 2:
                scale = parameter.abs().amax(dim=1, keepdim=True) / 127
                parameter.copy_(torch.round(parameter / scale) * scale)
        features = []
        for picture in pictures:
            values, positions = patches(picture, spec)
            features.append(rounded.model.encoder.get_image_features(
                torch.from_numpy(values[None]), torch.from_numpy(positions[None])).pooler_output.numpy())
    return np.concatenate(features).reshape(-1, model.config.text_config.hidden_size)


def test_an_int8_tower_is_close_to_the_fp32_one_and_reported(with_images, tmp_path):
    """--vision-weight-format int8: the tower's matrices stored int8 and its features as close to the fp32 tower's as
    transformers' own tower with those int8 weights (OpenVINO: weight-only int8, so within 1.5x of that; ONNX Runtime
    also rounds each matmul's input to 8 bits with one scale, so only a bound that a wrong op breaks), and the
    quality report's image rows measure it (the fp32 side reading its own tower's features)."""
    model, fp32_artifact = with_images
    artifact = export(fp32_artifact.parent / "checkpoint", tmp_path / "tower-int8.dg", recipe="cpu-fp32",
                      vision_weight_format="int8")
    manifest = json.loads((artifact / "manifest.json").read_text())
    tower = {name: t["format"] for name, t in manifest["weights"]["tensors"].items() if "vision" in name}
    assert tower["model.encoder.vision_tower.encoder.layers.0.mlp.down_proj.linear.weight"] == "int8"
    assert tower["model.encoder.vision_tower.patch_embedder.position_embedding_table"] == "fp32"  # looked up
    assert manifest["weights"]["roles"]["vision"] == "int8" and manifest["precision"].endswith("int8 vision")
    fp32_manifest = json.loads((fp32_artifact / "manifest.json").read_text())
    planned = tower_sizes(load_config(fp32_artifact.parent / "checkpoint"))  # what --dry-run prints
    assert (fp32_manifest["weights"]["stored_bytes"] - manifest["weights"]["stored_bytes"] ==
            planned["fp32"] - planned["int8"])
    pictures = [random_picture(40, 60, 3), random_picture(70, 30, 4)]
    fp32 = DiffusionGemma(fp32_artifact).image_features(pictures)[0]
    runtime = DiffusionGemma(fp32_artifact)
    expected = np.linalg.norm(int8_tower_features(model, pictures, runtime.image_spec) - fp32) / np.linalg.norm(fp32)
    assert expected > 1e-3  # int8 changes these features measurably
    for backend, bound in (("openvino", 1.5 * expected), ("onnxruntime", 0.1)):
        ours = DiffusionGemma(artifact, backend=backend).image_features(pictures)[0]
        error = np.linalg.norm(ours - fp32) / np.linalg.norm(fp32)
        assert 0.5 * expected < error < bound, (backend, error, expected)
    report = json.loads((artifact / "quality.json").read_text())
    assert [row["backend"] for row in report["images"]] == ["onnxruntime", "openvino"]
    for row in report["images"]:
        assert 1e-3 < row["feature_relative_error"] < 0.1
        assert row["steps_compared"] > 0 and 0.9 < row["step_argmax_agreement"] < 1.0
    assert all(row["step_argmax_agreement"] > 0.999 for row in report["backends"])  # fp32 text: the text is exact


def test_the_tower_takes_no_4_bit_weights(with_images, tmp_path):
    with pytest.raises(UserError, match="int4 is not offered"):
        export(with_images[1].parent / "checkpoint", tmp_path / "tower-int4.dg", vision_weight_format="int4")
    assert not (tmp_path / "tower-int4.dg").exists()
