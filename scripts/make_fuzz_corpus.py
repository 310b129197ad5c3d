#!/usr/bin/env python3
"""Writes the seed corpus of harness/tests/fuzz.rs: inputs for the safetensors loader, the
checkpoint config parser and the dataset loaders. A file's name says what the loader must do
with it: `ok_*` loads, `err_*` fails with an error naming the file, `any_*` either (never a
panic). The fuzz test replays every file and mutates them. Add an input that broke a loader
here (or drop the file in by hand) so it is replayed forever.
Usage: python3 scripts/make_fuzz_corpus.py   (rewrites harness/tests/corpus/)"""
import json, os, struct

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness", "tests", "corpus")


def put(sub, name, data):
    d = os.path.join(root, sub)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def st(tensors, meta=None, header_override=None, pad=b""):
    """A safetensors file: u64 LE header length, JSON header, data."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if meta is not None:
        header["__metadata__"] = meta
    h = header_override if header_override is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + pad + data


f32 = lambda xs: struct.pack(f"<{len(xs)}f", *xs)
put("safetensors", "ok_f32.safetensors", st({"wte.weight": ("F32", [4, 3], f32(range(12))), "ln_f.bias": ("F32", [3], f32([0, 1, 2]))}))
put("safetensors", "ok_hf_prefixes_and_buffers.safetensors", st({
    "transformer.wpe.weight": ("F32", [2, 2], f32([1, 2, 3, 4])),
    "transformer.h.0.attn.bias": ("F32", [1, 1, 2, 2], f32([1, 0, 1, 1])),
    "lm_head.weight": ("F32", [1], f32([0])),
}, meta={"format": "pt"}))
put("safetensors", "ok_bf16_f16.safetensors", st({"a": ("BF16", [2], b"\x80\x3f\x00\x40"), "b": ("F16", [2], b"\x00\x3c\x00\x40")}))
put("safetensors", "ok_empty.safetensors", st({}))
put("safetensors", "ok_scalar.safetensors", st({"s": ("F32", [], f32([3.5]))}))
put("safetensors", "err_offsets_past_end.safetensors", st({}, header_override=json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()))
put("safetensors", "err_shape_disagrees_with_offsets.safetensors", st({}, header_override=json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 8]}}).encode(), pad=b"\0" * 8))
put("safetensors", "err_integer_dtype.safetensors", st({"ids": ("I64", [2], struct.pack("<2q", 1, 2))}))
put("safetensors", "err_header_length_huge.safetensors", struct.pack("<Q", 1 << 62) + b"{}")
put("safetensors", "err_header_not_json.safetensors", struct.pack("<Q", 5) + b"{\"w\":")
put("safetensors", "err_short_prefix.safetensors", b"\x05\x00")
put("safetensors", "err_empty_file.safetensors", b"")
put("safetensors", "err_overlapping.safetensors", st({}, header_override=json.dumps({
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(), pad=f32([1, 2, 3])))

cfg = {"model": {"name": "tiny", "n_layer": 4, "n_embd": 128, "n_head": 4, "n_ctx": 64, "vocab": 259},
       "head": "lm", "tokenizer": "byte", "step": 400, "seed": 0,
       "scaler": {"scale": 65536.0, "clean_steps": 3, "hysteresis_left": 2}}
put("config", "ok_current.json", json.dumps(cfg, indent=2))
old = dict(cfg); old.pop("scaler"); old["loss_scale"] = None
put("config", "ok_older_with_loss_scale.json", json.dumps(old))
put("config", "ok_value_head_bpe.json", json.dumps(dict(cfg, head="value", tokenizer="gpt2")))
put("config", "err_truncated.json", json.dumps(cfg)[:60])
put("config", "err_no_model.json", json.dumps({k: v for k, v in cfg.items() if k != "model"}))
put("config", "err_unknown_head.json", json.dumps(dict(cfg, head="classifier")))
put("config", "err_negative_step.json", json.dumps(dict(cfg, step=-1)))
put("config", "err_string_sizes.json", json.dumps(dict(cfg, model=dict(cfg["model"], n_layer="4"))))
put("config", "any_huge_numbers.json", json.dumps(dict(cfg, model=dict(cfg["model"], n_layer=2**40, n_embd=2**40))))
put("config", "err_empty.json", "")

rec = lambda **k: json.dumps(k)
put("jsonl", "ok_sft.jsonl", "\n".join([rec(prompt="sort 312:", completion="123"), rec(prompt="reverse abc:", completion="cba")]) + "\n")
put("jsonl", "ok_prefs.jsonl", rec(prompt="sort 21:", chosen="12", rejected="21") + "\n")
put("jsonl", "ok_prompts.jsonl", rec(prompt="write something kind:") + "\n" + rec(prompt="sort 9:") + "\n")
put("jsonl", "any_crlf_and_blank_lines.jsonl", rec(prompt="a", completion="b") + "\r\n\r\n" + rec(prompt="c", completion="d") + "\r\n")
put("jsonl", "ok_sft_after_a_bom.jsonl", "\ufeff" + rec(prompt="a", completion="b") + "\n")
put("jsonl", "any_unicode.jsonl", rec(prompt="trié ✓ 日本", completion="\u0000\u2028") + "\n")
put("jsonl", "any_extra_fields.jsonl", json.dumps({"prompt": "a", "completion": "b", "id": 7, "meta": {"x": [1, 2]}}) + "\n")
put("jsonl", "err_wrong_type.jsonl", rec(prompt="a", completion="b") + "\n" + json.dumps({"prompt": 3, "completion": "b"}) + "\n")
put("jsonl", "err_truncated_line.jsonl", rec(prompt="a", completion="b") + "\n" + '{"prompt": "a", "comp')
put("jsonl", "err_not_utf8.jsonl", b'{"prompt": "a\xff\xfe", "completion": "b"}\n')
put("jsonl", "err_array_line.jsonl", '["prompt", "completion"]\n')
put("jsonl", "err_empty.jsonl", "")
put("jsonl", "err_only_blank_lines.jsonl", "\n\n  \n")
