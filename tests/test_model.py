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
    assert (labels[: len(ids) - len(sup)] == IGNORE_INDEX).all()


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
