// The RoPE pairing rule, shared by the kernels, their CPU references, the backends and the model's
// hyper-parameters. It lives here, in the lowest layer that needs it.
#pragma once

namespace starserve {

// How RoPE pairs the dimensions of a head.
// kInterleaved: (x[2i], x[2i+1]) rotate together — the layout of Q/K weights in llama.cpp GGUF files,
//               whose converter permutes the rows of attn_q/attn_k.
// kHalf:        (x[i], x[i + head_dim/2]) rotate together — Hugging Face's rotate_half layout.
enum class RopeStyle { kInterleaved, kHalf };

}  // namespace starserve
