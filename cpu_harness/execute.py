"""Run what vLLM compiled, on the CPU: V1 forward steps with real inputs.

``Runner(model, vllm_config)`` feeds a vLLM model the inputs vLLM's V1
model runner would: token ids, positions, and the V1 attention metadata the
Triton backend reads (``FlashAttentionMetadata``: query_start_loc, seq_lens,
block_table, slot_mapping, ...) inside ``set_forward_context``, with a paged
KV cache bound to every attention layer (``[2, num_blocks, block_size, Hkv,
D]``, as ``TritonAttentionBackend.get_kv_cache_shape`` allocates it).

``STEPS`` is one schedule of two steps that mixes everything the kernel
handles, so that the second step reads back what the first wrote:

    step 1 (23 tokens): seq 0 prefill 7, seq 1 prefill 5, seq 2 first chunk 11 of 20
    step 2 (13 tokens): seq 0 decode, seq 1 decode, seq 2 chunk 9 with context 11
                        (crosses a 16-token block), seq 3 prefill 2

CUDA kernels never run: the ``_C`` ops are served by ``stand_ins`` (CPU
registrations on the real schemas), attention by the overlay's Triton
kernel under ``TRITON_INTERPRET=1``.  There are no CUDA graphs on a CPU: the
step sizes are not capture sizes, so vLLM's ``PiecewiseBackend`` runs its
general-shape compiled graph, as it does for batches above the largest
capture size.
"""
import dataclasses
import itertools
from typing import List, Tuple

import stand_ins

# (sequence, new tokens) per step
STEPS: Tuple[Tuple[Tuple[int, int], ...], ...] = (
    ((0, 7), (1, 5), (2, 11)),
    ((0, 1), (1, 1), (2, 9), (3, 2)),
)
BLOCK_SIZE = 16
MAX_SEQS = 5                 # sequences 0..4, two blocks each
MAX_LEN = 2 * BLOCK_SIZE
NUM_BLOCKS = 2 * MAX_SEQS + 1


@dataclasses.dataclass
class StepOutput:
    hidden: object        # [T, hidden] model output (bf16)
    logits: object        # [T, vocab] fp32


class Runner:
    """Steps of one model with its own KV cache (see the module doc)."""

    def __init__(self, model, vllm_config, seed=0, engine="v1"):
        import torch
        self.model, self.vllm_config, self.engine = model, vllm_config, engine
        self.layers = vllm_config.compilation_config.static_forward_context
        self.context = {}                 # sequence -> tokens in the cache
        gen = torch.Generator().manual_seed(seed)
        vocab = vllm_config.model_config.get_vocab_size()
        # sequence -> its token ids (random prompts; greedy() appends)
        self.seqs = {seq: torch.randint(3, vocab, (MAX_LEN, ), generator=gen)
                     for seq in range(MAX_SEQS)}
        self.kv_caches = {}
        for name, layer in self.layers.items():
            # poisoned: unwritten slots are noise; FP8 caches are uint8, as
            # vLLM's V1 runner allocates them
            shape = (2, NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, layer.head_size)
            if layer.kv_cache_dtype.startswith("fp8"):
                cache = torch.randint(0, 0x7f, shape, generator=gen,
                                      dtype=torch.uint8)
            else:
                cache = torch.randn(shape, generator=gen).to(
                    vllm_config.model_config.dtype)
            layer.kv_cache = [cache]
            self.kv_caches[name] = cache

    @staticmethod
    def blocks_of(seq):
        """Sequence ``seq``'s blocks: never block 0, not contiguous."""
        return [2 * seq + 1, 2 * seq + 2]

    def metadata(self, step):
        """(input ids, positions, attention metadata) of ``step``."""
        return self.metadata_v0(step) if self.engine == "v0" \
            else self.metadata_v1(step)

    def metadata_v1(self, step):
        import torch
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata
        ids, positions, slots, q_lens, seq_lens = [], [], [], [], []
        for seq, n in step:
            start = self.context.get(seq, 0)
            pos = torch.arange(start, start + n)
            blocks = torch.tensor(self.blocks_of(seq))
            positions.append(pos)
            ids.append(self.seqs[seq][pos])
            slots.append(blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            q_lens.append(n)
            seq_lens.append(start + n)
        q_lens = torch.tensor(q_lens, dtype=torch.int32)
        metadata = FlashAttentionMetadata(
            num_actual_tokens=int(q_lens.sum()),
            max_query_len=int(q_lens.max()),
            query_start_loc=torch.cat([q_lens.new_zeros(1), q_lens.cumsum(0)]).to(torch.int32),
            max_seq_len=max(seq_lens),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=torch.tensor([self.blocks_of(s) for s, _ in step],
                                     dtype=torch.int32),
            slot_mapping=torch.cat(slots).to(torch.int64),
            use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
            prefix_kv_lens=None, suffix_kv_lens=None,
            num_input_tokens=int(q_lens.sum()))
        return torch.cat(ids), torch.cat(positions), metadata

    def is_decode(self, entry):
        seq, n = entry
        return n == 1 and self.context.get(seq, 0) > 0

    def order(self, step):
        """V0 batches put prefills first, decodes last; V1 keeps any order."""
        return tuple(sorted(step, key=self.is_decode)) if self.engine == "v0" \
            else tuple(step)

    def metadata_v0(self, step):
        """V0's ``FlashAttentionMetadata`` (what TRITON_ATTN_VLLM_V0 reads)
        for ``step`` in V0 order."""
        import torch
        from vllm.attention.backends.flash_attn import FlashAttentionMetadata
        input_ids, positions, v1 = self.metadata_v1(step)
        decodes = [self.is_decode(e) for e in step]
        seq_lens = v1.seq_lens.tolist()
        prefill_lens = [n for n, d in zip(seq_lens, decodes) if not d]
        decode_lens = [n for n, d in zip(seq_lens, decodes) if d]
        q_lens = v1.query_start_loc.diff()
        # As V0's builder: without chunked prefill (no chunk on top of a
        # context in this step) a fresh prompt's block table is empty
        # (FlashAttention reads its new K/V directly), padded with 0.
        from vllm.utils import make_tensor_with_pad
        chunked = any(n > 1 and self.context.get(seq, 0) > 0 for seq, n in step)
        tables = [self.blocks_of(seq) if chunked or self.context.get(seq, 0) > 0
                  else [] for seq, _ in step]
        block_tables = make_tensor_with_pad(tables, pad=0, dtype=torch.int)
        return input_ids, positions, FlashAttentionMetadata(
            num_prefills=len(prefill_lens),
            num_prefill_tokens=sum(n for (_, n), d in zip(step, decodes) if not d),
            num_decode_tokens=len(decode_lens),
            slot_mapping=v1.slot_mapping, multi_modal_placeholder_index_maps=None,
            enable_kv_scales_calculation=False, seq_lens=seq_lens,
            seq_lens_tensor=v1.seq_lens,
            max_prefill_seq_len=max(prefill_lens, default=0),
            max_decode_seq_len=max(decode_lens, default=0),
            context_lens_tensor=v1.seq_lens - q_lens,
            block_tables=block_tables, use_cuda_graph=False,
            max_query_len=v1.max_query_len, max_decode_query_len=1,
            query_start_loc=v1.query_start_loc,
            seq_start_loc=torch.cat([v1.seq_lens.new_zeros(1),
                                     v1.seq_lens.cumsum(0)]).to(torch.int32))

    def step(self, step) -> StepOutput:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import set_forward_context
        step = self.order(step)
        input_ids, positions, metadata = self.metadata(step)
        capture = self.vllm_config.compilation_config.cudagraph_capture_sizes
        if len(input_ids) in (capture or ()):
            raise ValueError(f"{len(input_ids)} tokens is a CUDA-graph capture "
                             "size: PiecewiseBackend would capture on a CPU")
        with set_current_vllm_config(self.vllm_config), torch.inference_mode(), \
                set_forward_context(metadata, self.vllm_config), \
                stand_ins.registered("CPU"):
            hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden, None)
        for seq, n in step:
            self.context[seq] = self.context.get(seq, 0) + n
        return StepOutput(hidden.clone(), logits.float())

    def run(self, steps=STEPS) -> List[StepOutput]:
        return [self.step(s) for s in steps]

    def greedy(self, prompt_lens=(5, 6, 7), new_tokens=4):
        """Greedy continuation of sequences 0..len(prompt_lens)-1 (random
        prompts of those lengths): one prefill step, then one decode step per
        token for all of them; returns the new token ids per sequence."""
        step = tuple(enumerate(prompt_lens))
        for i in range(new_tokens):
            logits = self.step(step).logits
            ends = itertools.accumulate(n for _, n in step)
            for (seq, _), end in zip(step, ends):
                self.seqs[seq][self.context[seq]] = int(logits[end - 1].argmax())
            step = tuple((seq, 1) for seq, _ in step)
        return [self.seqs[seq][n:n + new_tokens].tolist()
                for seq, n in enumerate(prompt_lens)]

    def written_kv(self):
        """{layer: K/V rows of every slot the steps wrote} (fp32)."""
        import torch
        slots = torch.tensor([
            self.blocks_of(seq)[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE
            for seq, n in sorted(self.context.items()) for i in range(n)])
        out = {}
        for name, cache in self.kv_caches.items():
            rows = cache.flatten(1, 2)[:, slots]  # [2, slots, Hkv, D]
            if rows.dtype == torch.uint8:
                rows = rows.view(torch.float8_e4m3fn)
            out[name] = rows.float()
        return out
