"""Block tables per request: which blocks of the pool hold a request's KV, and prefix-cache hits."""

from __future__ import annotations

from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.core.kv_cache_utils import extend_block_hashes
from folovllm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_hashes: dict[str, list[int]] = {}
        # How many of a request's first blocks are already in the prefix cache: each step caches
        # only the blocks that became full since, so a step's cost does not grow with the context.
        self.num_cached_block: dict[str, int] = {}
        # Prefix-cache counters, for metrics.
        self.num_cached_queries = 0
        self.num_cached_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def _block_hashes(self, request: Request) -> list[int]:
        """The hashes of the request's full blocks, extending the list kept from earlier calls in
        place (only blocks that became full since are hashed)."""
        hashes = self.req_to_block_hashes.get(request.request_id)
        if hashes is None:
            hashes = self.req_to_block_hashes[request.request_id] = []
        if (len(hashes) + 1) * self.block_size <= request.num_tokens:
            salt = (request.cache_salt,) if request.cache_salt is not None else None
            extend_block_hashes(hashes, self.block_size, request.all_token_ids, salt)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest chain of cached full blocks that starts the request, and how many tokens
        they cover. The last token is always recomputed: its logits are needed to sample."""
        if not self.enable_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.block_pool.get_cached_prefix(self._block_hashes(request)[:max_hit_blocks])
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count a lookup once its request is admitted (a waiting request is looked up each step)."""
        self.num_cached_queries += num_tokens
        self.num_cached_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> list[KVCacheBlock] | None:
        """Make the request's blocks cover its computed tokens plus num_new_tokens. Returns the new
        blocks, or None (changing nothing) when the pool cannot supply them."""
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}")
        req_blocks = self.req_to_blocks.get(request.request_id)
        if req_blocks and not new_computed_blocks:
            # The common decode step: the tokens still fit the blocks the request holds.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(req_blocks) * self.block_size:
                if self.enable_caching and total // self.block_size > self.num_cached_block.get(request.request_id, 0):
                    self._cache_full_blocks(request, req_blocks, total)
                return []
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - len(req_blocks) - len(new_computed_blocks)
        # Cache hits that sit in the free queue stop being free once touched.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.block_pool.get_num_free_blocks():
            if not req_blocks:
                del self.req_to_blocks[request.request_id]
            return None
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            if self.enable_caching and len(req_blocks) == len(new_computed_blocks):
                # all of its blocks are hits, in the cache already under these hashes
                rid = request.request_id
                self.num_cached_block[rid] = max(self.num_cached_block.get(rid, 0), len(req_blocks))
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        req_blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, req_blocks, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, req_blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Enter the blocks that are full once num_tokens are computed in the prefix cache, from
        the first one not entered yet. (A block full of slots whose last token is still being
        sampled, with async scheduling, has no hash yet: it is entered at a later step.)"""
        start = self.num_cached_block.get(request.request_id, 0)
        if num_tokens // self.block_size <= start:
            return
        hashes = self._block_hashes(request)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            self.block_pool.cache_block(req_blocks[i], hashes[i])
        self.num_cached_block[request.request_id] = max(start, end)

    def fork(self, source: Request, child: Request) -> tuple[int, int] | None:
        """Admit `child`, a request with the same prompt as `source` (a sibling of parallel
        sampling), on the blocks of `source`'s computed prompt instead of computing it again. The
        child starts at num_computed_tokens = its prompt's length - 1: it recomputes the last prompt
        token, whose logits it samples from. Every full block before the one holding that token is
        shared (one more reference each); the block holding it, the only one the child writes, is
        copied into a new block first (copy-on-write). Returns the (source, destination) block ids
        the runner copies before the step's forward pass, or None (changing nothing) when no block
        is free."""
        num_blocks = cdiv(child.num_prompt_tokens, self.block_size)
        source_blocks = self.req_to_blocks[source.request_id][:num_blocks]
        assert len(source_blocks) == num_blocks, f"{source} has not computed its prompt"
        assert child.request_id not in self.req_to_blocks, f"{child} already holds blocks"
        if self.block_pool.get_num_free_blocks() < 1:
            return None
        shared = source_blocks[:-1]
        self.block_pool.touch(shared)
        [copy] = self.block_pool.get_new_blocks(1)
        blocks = self.req_to_blocks[child.request_id] = shared + [copy]
        if self.enable_caching:
            self._cache_full_blocks(child, blocks, child.num_prompt_tokens)
        return source_blocks[-1].block_id, copy.block_id

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.req_to_block_hashes.pop(request.request_id, None)
        self.num_cached_block.pop(request.request_id, None)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
