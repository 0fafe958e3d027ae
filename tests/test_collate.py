"""SFT collation: labels only on assistant tokens, image tokens consistent with the image grid,
right padding that does not change a row's loss, left-padded prompts for generation."""
import pytest
import torch
from PIL import Image

import data
import model as models
import sft


@pytest.fixture(scope="module")
def tiny():
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    return m, processor


@pytest.fixture()
def image_path(tmp_path):
    p = tmp_path / "img.png"
    Image.new("RGB", (96, 96), "white").save(p)
    return str(p)


def row(image_path, answers=("<caption>- a</caption><think>1</think><answer>1</answer>",)):
    messages = [{"role": "system", "content": data.SYSTEM_PROMPT},
                {"role": "user", "content": "<image>\nHow many red circles are there?"}]
    for i, a in enumerate(answers):
        if i:
            messages.append({"role": "user", "content": "And now?"})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages, "images": [image_path]}


def test_labels_only_on_assistant_tokens_and_im_end(tiny, image_path):
    _, processor = tiny
    tok = processor.tokenizer
    answer = "<caption>- one red circle</caption><think>red circles: 1</think><answer>1</answer>"
    x = data.encode_sft(row(image_path, (answer,)), processor)
    labelled = x["labels"][x["labels"] != -100]
    # exactly the answer's tokens followed by <|im_end|>
    assert labelled.tolist() == tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(labelled) == answer + "<|im_end|>"
    # and they sit at the end of the sequence (only the template's final newline follows)
    positions = (x["labels"] != -100).nonzero().flatten()
    assert positions[-1].item() == len(x["input_ids"]) - 2


def test_multi_turn_labels_every_assistant_turn(tiny, image_path):
    _, processor = tiny
    tok = processor.tokenizer
    x = data.encode_sft(row(image_path, ("<answer>1</answer>", "<answer>2</answer>")), processor)
    text = tok.decode(x["labels"][x["labels"] != -100])
    assert text == "<answer>1</answer><|im_end|><answer>2</answer><|im_end|>"
    # the user's second turn is not labelled
    assert "And now" not in text


def test_image_tokens_match_the_grid(tiny, image_path):
    m, processor = tiny
    x = data.encode_sft(row(image_path), processor)
    grid = x["image_grid_thw"]  # (1, 3): t, h, w in patches
    merge = processor.image_processor.merge_size
    n_image_tokens = (x["input_ids"] == m.config.image_token_id).sum().item()
    assert n_image_tokens == int(grid.prod()) // merge**2 == 36
    assert x["pixel_values"].shape[0] == int(grid.prod())
    assert torch.equal(x["mm_token_type_ids"].bool(), x["input_ids"] == m.config.image_token_id)
    # image tokens never carry labels
    assert (x["labels"][x["input_ids"] == m.config.image_token_id] == -100).all()


def test_right_padding_does_not_change_the_loss_of_a_row(tiny, image_path):
    m, processor = tiny
    short = data.encode_sft(row(image_path, ("<answer>1</answer>",)), processor)
    long = data.encode_sft(row(image_path, ("<caption>- many words here</caption><think>a b c d e f</think><answer>12</answer>",)), processor)
    pad = processor.tokenizer.pad_token_id
    alone = data.collate_sft([short], pad)
    batch = data.collate_sft([short, long], pad)
    assert batch["input_ids"].shape[1] == len(long["input_ids"])
    assert batch["attention_mask"][0].sum().item() == len(short["input_ids"])
    assert batch["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        loss_alone, n_alone = sft.token_loss_sum(m, dict(alone))
        both = m(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (2, T, V)
    labels = batch["labels"][0, 1:len(short["input_ids"])]
    loss_in_batch = torch.nn.functional.cross_entropy(both[0, :len(short["input_ids"]) - 1], labels,
                                                      ignore_index=-100, reduction="sum")
    assert torch.allclose(loss_alone, loss_in_batch, atol=1e-4)


def test_prompts_are_left_padded_and_end_with_the_generation_prompt(tiny, image_path):
    _, processor = tiny
    rows = [{"messages": row(image_path)["messages"][:2], "images": [image_path]},
            {"messages": [{"role": "user", "content": "<image>\nHi"}], "images": [image_path]}]
    enc = data.encode_prompts(rows, processor)
    assert enc["attention_mask"][1, 0].item() == 0 and enc["attention_mask"][:, -1].all()
    tail = processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert enc["input_ids"][:, -len(tail):].tolist() == [tail, tail]
