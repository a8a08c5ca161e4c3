#!/usr/bin/env python3
"""Write a random-weight InternVL3 GGUF pair with the exact shapes of a released model, for speed and
memory measurements where real weights cannot be downloaded. Outputs are nonsense; the compute,
memory traffic and token counts are those of the real model.

  python3 -m pip install gguf numpy            # once
  python3 make_bench_model.py OUT_DIR [--shape internvl3-1b|internvl3-2b|small] [--type f16|q8_0]

Writes OUT_DIR/<shape>-<type>.gguf (arch qwen2, Qwen2 BPE vocabulary padded to the real size) and
OUT_DIR/mmproj-<shape>-f16.gguf (clip, projector internvl). The vocabulary and chat template are
taken from the tiny converter-made fixture (tests/fixtures/tiny-internvl/tiny-internvl3-f32.gguf).

Copied from the workplace's shared/tools, with three changes so the files have the form of the
published ones (llama.cpp's converter): the language model has an untied `output.weight` (the real
InternVL3-1B has one), and `v.class_embd` / `v.position_embd.weight` are 3-D with the class
token's row first.
"""
import argparse
import os

import numpy as np
import gguf

SHAPES = {
    # text: Qwen2.5-0.5B (InternVL3-1B); vision: InternViT-300M-448px-V2.5
    "internvl3-1b": dict(n_embd=896, n_layer=24, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151674,
                         v_embd=1024, v_layer=24, v_head=16, v_ff=4096),
    # text: Qwen2.5-1.5B (InternVL3-2B)
    "internvl3-2b": dict(n_embd=1536, n_layer=28, n_head=12, n_head_kv=2, n_ff=8960, n_vocab=151674,
                         v_embd=1024, v_layer=24, v_head=16, v_ff=4096),
    # a quick shape for smoke runs
    "small": dict(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768, n_vocab=16384,
                  v_embd=256, v_layer=4, v_head=4, v_ff=1024),
}
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def rnd(rng, shape, scale):
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def put(w, name, arr, qtype):
    if qtype == "q8_0" and arr.ndim == 2 and arr.shape[-1] % 32 == 0:
        data = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif qtype in ("f16", "q8_0") and arr.ndim >= 2:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, arr.astype(np.float32))


def copy_vocab(w, src, n_vocab):
    r = gguf.GGUFReader(src)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.merges"].data]
    tmpl = bytes(f["tokenizer.chat_template"].parts[-1]).decode("utf-8")
    ids = {k: int(f[k].parts[-1][0]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                                                "tokenizer.ggml.padding_token_id") if k in f}
    assert n_vocab >= len(toks)
    # The real vocabulary's rest is ordinary BPE tokens: NORMAL. As
    # USER_DEFINED, llama.cpp's tokenizer searched every text for all ~150k of
    # them (about 3 ms per call), which no real model costs.
    for i in range(len(toks), n_vocab):
        toks.append(f"<|extra_{i}|>")
        types.append(int(gguf.TokenType.NORMAL))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(ids["tokenizer.ggml.eos_token_id"])
    w.add_pad_token_id(ids["tokenizer.ggml.padding_token_id"])
    w.add_chat_template(tmpl)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="internvl3-1b", choices=sorted(SHAPES))
    ap.add_argument("--type", default="q8_0", choices=["f16", "q8_0"])
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    vocab_src = os.path.join(here, "..", "tests", "fixtures", "tiny-internvl", "tiny-internvl3-f32.gguf")
    rng = np.random.default_rng(a.seed)

    text = os.path.join(a.out, f"{a.shape}-{a.type}.gguf")
    w = gguf.GGUFWriter(text, "qwen2")
    w.add_name(f"{a.shape} random weights (benchmark shape only)")
    w.add_context_length(32768)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if a.type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    copy_vocab(w, vocab_src, s["n_vocab"])
    e, kv = s["n_embd"], s["n_embd"] // s["n_head"] * s["n_head_kv"]
    put(w, "token_embd.weight", rnd(rng, (s["n_vocab"], e), 0.05), a.type)
    for i in range(s["n_layer"]):
        put(w, f"blk.{i}.attn_norm.weight", np.ones(e, np.float32), a.type)
        put(w, f"blk.{i}.attn_q.weight", rnd(rng, (e, e), e ** -0.5), a.type)
        put(w, f"blk.{i}.attn_q.bias", rnd(rng, (e,), 0.02), a.type)
        put(w, f"blk.{i}.attn_k.weight", rnd(rng, (kv, e), e ** -0.5), a.type)
        put(w, f"blk.{i}.attn_k.bias", rnd(rng, (kv,), 0.02), a.type)
        put(w, f"blk.{i}.attn_v.weight", rnd(rng, (kv, e), e ** -0.5), a.type)
        put(w, f"blk.{i}.attn_v.bias", rnd(rng, (kv,), 0.02), a.type)
        put(w, f"blk.{i}.attn_output.weight", rnd(rng, (e, e), e ** -0.5), a.type)
        put(w, f"blk.{i}.ffn_norm.weight", np.ones(e, np.float32), a.type)
        put(w, f"blk.{i}.ffn_gate.weight", rnd(rng, (s["n_ff"], e), e ** -0.5), a.type)
        put(w, f"blk.{i}.ffn_up.weight", rnd(rng, (s["n_ff"], e), e ** -0.5), a.type)
        put(w, f"blk.{i}.ffn_down.weight", rnd(rng, (e, s["n_ff"]), s["n_ff"] ** -0.5), a.type)
    put(w, "output_norm.weight", np.ones(e, np.float32), a.type)
    put(w, "output.weight", rnd(rng, (s["n_vocab"], e), 0.05), a.type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    mm = os.path.join(a.out, f"mmproj-{a.shape}-f16.gguf")
    v, vf = s["v_embd"], s["v_ff"]
    w = gguf.GGUFWriter(mm, "clip")
    w.add_name(f"{a.shape} mmproj random weights (benchmark shape only)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "internvl")
    for k, val in {"image_size": 448, "patch_size": 14, "embedding_length": v, "feed_forward_length": vf,
                   "block_count": s["v_layer"], "projection_dim": e, "attention.head_count": s["v_head"],
                   "projector.scale_factor": 2, "preproc_min_tiles": 1, "preproc_max_tiles": 12}.items():
        w.add_uint32(f"clip.vision.{k}", val)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", MEAN)
    w.add_array("clip.vision.image_std", STD)
    w.add_bool("clip.use_gelu", True)
    put(w, "v.patch_embd.weight", rnd(rng, (v, 3, 14, 14), 0.02), "f16")
    put(w, "v.patch_embd.bias", np.zeros(v, np.float32), "f32")
    put(w, "v.class_embd", rnd(rng, (1, 1, v), 0.02), "f32")
    put(w, "v.position_embd.weight", rnd(rng, (1, 1025, v), 0.02), "f32")
    for i in range(s["v_layer"]):
        for n, shp in {"attn_q": (v, v), "attn_k": (v, v), "attn_v": (v, v), "attn_out": (v, v),
                       "ffn_up": (vf, v), "ffn_down": (v, vf)}.items():
            put(w, f"v.blk.{i}.{n}.weight", rnd(rng, shp, shp[1] ** -0.5), "f16")
            put(w, f"v.blk.{i}.{n}.bias", np.zeros(shp[0], np.float32), "f32")
        for n in ("ln1", "ln2"):
            put(w, f"v.blk.{i}.{n}.weight", np.ones(v, np.float32), "f32")
            put(w, f"v.blk.{i}.{n}.bias", np.zeros(v, np.float32), "f32")
        put(w, f"v.blk.{i}.ls1.weight", np.full(v, 0.1, np.float32), "f32")
        put(w, f"v.blk.{i}.ls2.weight", np.full(v, 0.1, np.float32), "f32")
    put(w, "mm.model.mlp.0.weight", np.ones(4 * v, np.float32), "f32")
    put(w, "mm.model.mlp.0.bias", np.zeros(4 * v, np.float32), "f32")
    put(w, "mm.model.mlp.1.weight", rnd(rng, (e, 4 * v), (4 * v) ** -0.5), "f16")
    put(w, "mm.model.mlp.1.bias", np.zeros(e, np.float32), "f32")
    put(w, "mm.model.mlp.3.weight", rnd(rng, (e, e), e ** -0.5), "f16")
    put(w, "mm.model.mlp.3.bias", np.zeros(e, np.float32), "f32")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    for p in (text, mm):
        print(p, os.path.getsize(p) // (1 << 20), "MiB")


if __name__ == "__main__":
    main()
