"""The assembled VLM: prompt handling, splicing, loss mask, generation, and its bad inputs."""
import pytest
import torch
from PIL import Image

from nvila_lab.config import get_config
from nvila_lab.data import load_tokenizer
from nvila_lab.model import IGNORE_INDEX, NVILAModel, chat_prompt, user_text


@pytest.fixture(scope="module")
def model():
    return NVILAModel("tiny", load_tokenizer()).eval()


IMG = Image.new("RGB", (256, 192), "white")


def test_prompt_is_qwen2_chat_template():
    assert chat_prompt("<image>Hi") == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                                        "<|im_start|>user\n<image>Hi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_template_agrees_with_model_prompt(model):
    """The shipped tokenizer's own chat template renders the same prompt the model builds."""
    msgs = [{"role": "user", "content": "<image>What colour is the big shape?"}]
    rendered = model.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt("<image>What colour is the big shape?")


@pytest.mark.parametrize("question,n,expect", [
    ("What?", 1, "<image>What?"),  # no placeholder: the media goes first (NVILA's default)
    ("A <image> B", 1, "A <image> B"),
    ("<image><image> same?", 2, "<image><image> same?"),
])
def test_placeholders(question, n, expect):
    assert user_text(question, n) == expect


@pytest.mark.parametrize("question,n,message", [
    ("<image> and <image>", 1, "2 <image> placeholder\\(s\\) but 1"),
    ("<image> only", 2, "1 <image> placeholder\\(s\\) but 2"),
    ("", 1, "question is empty"),
    ("  <image>  ", 1, "question is empty"),
    (b"caf\xe9", 1, "not valid UTF-8"),
])
def test_bad_questions(question, n, message):
    with pytest.raises(ValueError, match=message):
        user_text(question, n)


def test_labels_supervise_answer_and_end_token_only(model):
    ids, labels = model.tokenize("How many dots are there?", "3")
    sup = labels[labels != IGNORE_INDEX]
    assert model.tokenizer.decode(sup) == "3<|im_end|>"
    n_prompt = len(model.tokenize("How many dots are there?")[0])
    assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[-1:] == IGNORE_INDEX).all()  # prompt and final "\n"
    assert labels[n_prompt:-1].tolist() == ids[n_prompt:-1].tolist() == sup.tolist()


def test_training_sequence_is_vilas_template_token_for_token(model):
    """The text of VILA's Qwen2 template (qwen2.jinja in NVlabs/VILA: every message '<|im_start|>role\\n' +
    content + '<|im_end|>\\n', a default system turn first), written out by hand, tokenized: the same ids."""
    text = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
            "<|im_start|>user\n<image>How many dots are there?<|im_end|>\n"
            "<|im_start|>assistant\n3<|im_end|>\n")
    ids, _ = model.tokenize("How many dots are there?", "3")
    assert ids.tolist() == model.tokenizer(text, add_special_tokens=False).input_ids
    prompt, _ = model.tokenize("How many dots are there?")
    gen = text[: text.index("3<|im_end|>")]  # inference ends at '<|im_start|>assistant\n'
    assert prompt.tolist() == model.tokenizer(gen, add_special_tokens=False).input_ids


def test_several_images_one_tile_each_unless_tile_all(model):
    from nvila_lab.tiling import plan_resize
    wide = Image.new("RGB", (90, 300), "blue")
    with torch.no_grad():
        (toks, kind), (single, _) = model.encode_prompts([[IMG, wide], IMG])
        e, mask, _ = model.batch([[IMG, wide]], ["<image> or <image>?"])
        tiled = NVILAModel("tiny", model.tokenizer, encoder=model.encoder, llm=model.llm, tile_all_images=True)
        (toks_t, _), = tiled.encode_prompts([[IMG, wide]])
    assert kind == "image" and [t.plan for t in toks] == [plan_resize(*im.size, 64) for im in (IMG, wide)]
    assert single[0].plan.mode == "dynamic_s2" and [t.plan.mode for t in toks_t] == ["dynamic_s2"] * 2
    ids, _ = model.tokenize("<image> or <image>?", n_media=2)
    assert mask.sum().item() == len(ids) - 2 + sum(t.n_positions for t in toks)
    assert "every image tiled" in repr(tiled) and "every image tiled" not in repr(model)


def test_video_frames_must_divide_the_pool():
    import numpy as np
    from nvila_lab.temporal import Video
    tok = load_tokenizer()
    clip = np.zeros((10, 64, 64, 3), np.uint8)
    m = NVILAModel(get_config("tiny", num_video_frames=8, temporal_pool=4), tok)
    with pytest.raises(ValueError, match="10 frames do not divide into groups of 4 \\(VILA requires a multiple\\)"):
        m.batch([Video(clip, num_frames=10)], ["What happened?"])
    m2 = NVILAModel(m.cfg.replace(temporal_kwargs={"tail": "average"}), tok, encoder=m.encoder, llm=m.llm)
    with torch.no_grad():
        (vt, _), = m2.encode_media([Video(clip, num_frames=10)])
    assert vt.n_separators == 3  # 4 + 4 + 2 frames


def test_flash_attention_without_flash_attn_is_one_line(monkeypatch):
    import sys
    from nvila_lab.config import MissingExtra
    from nvila_lab.model import build_llm
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(MissingExtra, match=r"flash_attention_2'? needs flash-attn, which is not installed: pip install 'nvila-lab\[gpu\]'"):
        build_llm(get_config("tiny"), attn_implementation="flash_attention_2")


def test_splice_places_tokens_and_separator(model):
    ids, labels = model.tokenize("What colour is the big shape?", "red")
    with torch.no_grad():
        (vt,) = model.encoder.encode_batch([IMG])
        emb, lab = model.splice(ids, labels, [vt])
    pos = int((ids == model.media_ids["image"]).nonzero())
    assert emb.shape[0] == len(ids) - 1 + vt.n_positions
    assert torch.allclose(emb[pos:pos + vt.n_tokens], vt.segments[0])
    assert torch.allclose(emb[pos + vt.n_tokens], model.separator()[0])
    assert (lab[pos:pos + vt.n_positions] == IGNORE_INDEX).all()


def test_more_placeholders_than_images(model):
    ids, labels = model.tokenize("<image> vs <image>", n_media=2)
    with torch.no_grad():
        (vt,) = model.encoder.encode_batch([IMG])
    with pytest.raises(ValueError, match="2 media placeholder\\(s\\) but 1"):
        model.splice(ids, labels, [vt])


def test_budget_overflowing_max_length_is_refused():
    m = NVILAModel(get_config("tiny", max_length=100), load_tokenizer())
    with pytest.raises(ValueError, match="max_length=100"):
        m.batch([IMG], ["What colour is the big shape?"])


def test_tokenizer_too_big_for_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        NVILAModel(get_config("tiny", vocab_size=64), load_tokenizer())


def test_loss_and_gradients_reach_every_part():
    m = NVILAModel("tiny", load_tokenizer())
    loss = m([IMG, IMG], ["What colour is the big shape?", "Where is the big shape?"], ["red", "top left"])
    assert torch.isfinite(loss)
    loss.backward()
    for p in (m.vision_tower.embeddings.patch_embedding.weight, m.mm_projector.layers[2].weight,
              m.llm.model.embed_tokens.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_generation_greedy_is_deterministic_and_cache_agrees(model):
    a = model.generate(IMG, "What colour is the big shape?", max_new_tokens=6)
    assert a == model.generate(IMG, "What colour is the big shape?", max_new_tokens=6)
    embeds, mask, _ = model.batch([IMG], ["What colour is the big shape?"])
    with torch.no_grad():
        with_cache = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        use_cache=True, eos_token_id=model.end_id, pad_token_id=model.tokenizer.pad_token_id)
        no_cache = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      use_cache=False, eos_token_id=model.end_id, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(with_cache, no_cache)


def test_sampling_is_seeded(model):
    a = model.generate(IMG, "Where is the big shape?", max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    assert a == model.generate(IMG, "Where is the big shape?", max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
