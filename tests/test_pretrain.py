"""The pretrained base (pretrain.py) on a 3-step recipe: labels, the cache, the recipe key."""
import json
import os
import random

import pretrain
import task


def test_labels_cover_every_answer_and_nothing_else():
    import model as models
    processor = models.load_processor(models.build_embedded("tiny-random"))
    rng = random.Random(0)
    scene = pretrain.scenes(rng, 1, 96)[0]
    turns = pretrain.conversation(scene, rng, describe_frac=1.0, questions=2)
    assert turns[0] == (pretrain.DESCRIBE, task.describe(scene["objects"]) + ".") and len(turns) == 3
    batch = pretrain.encode_batch(processor, [pretrain.messages(turns)], [task.render(scene)])
    labelled = batch["input_ids"][0][batch["labels"][0] != -100]
    text = processor.tokenizer.decode(labelled)
    # the three answers, each closed by <|im_end|>; no question, no image token
    assert text == "".join(a + "<|im_end|>" for _, a in turns)


def test_build_is_cached_by_recipe(tmp_path, monkeypatch):
    recipe = dict(pretrain.RECIPES["tiny"], steps=3, batch_size=4, eval_scenes=4)
    monkeypatch.setitem(pretrain.RECIPES, "tiny", recipe)
    path = pretrain.build("tiny", cache_dir=str(tmp_path), log=lambda *a: None)
    info = json.load(open(os.path.join(path, "pretrain.json")))
    assert info["recipe"] == recipe and 0 <= info["heldout_object_list_acc"] <= 1
    assert pretrain.build("tiny", cache_dir=str(tmp_path)) == path  # reused, not rebuilt
    monkeypatch.setitem(pretrain.RECIPES, "tiny", dict(recipe, lr=1e-3))
    assert pretrain.build("tiny", cache_dir=str(tmp_path), log=lambda *a: None) != path
