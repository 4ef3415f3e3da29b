"""The pass sampler: DistributedSampler's order, cut into batches, without building the whole index list."""
import pytest
from torch.utils.data.distributed import DistributedSampler

from training.pair_stream import ShardBatches


def distributed_sampler_batches(n, world_size, rank, seed, pass_index, batch_size):
    """The batches the earlier pipeline gave: DistributedSampler(shuffle, drop_last) + drop_last batching."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(pass_index)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


@pytest.mark.parametrize("n, world_size, batch_size", [(103, 1, 8), (103, 4, 5), (1000, 16, 7), (64, 3, 21)])
@pytest.mark.parametrize("seed, pass_index", [(0, 0), (5, 3)])
def test_same_batches_as_the_distributed_sampler(n, world_size, batch_size, seed, pass_index):
    for rank in range(world_size):
        expected = distributed_sampler_batches(n, world_size, rank, seed, pass_index, batch_size)
        batches = ShardBatches(n, world_size, rank, seed, pass_index, batch_size)
        assert list(batches) == expected and len(batches) == len(expected)
        # Resuming mid-pass starts at a batch boundary, with the same batches after it.
        skipped = ShardBatches(n, world_size, rank, seed, pass_index, batch_size, skip_batches=2)
        assert list(skipped) == expected[2:] and len(skipped) == max(0, len(expected) - 2)


def test_shards_partition_the_pass_and_passes_differ():
    shards = [set(ShardBatches(1000, 4, rank, 0, 0, 10).shard().tolist()) for rank in range(4)]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert len(set().union(*shards)) == 1000
    assert ShardBatches(1000, 4, 0, 0, 0, 10).shard().tolist() != ShardBatches(1000, 4, 0, 0, 1, 10).shard().tolist()
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        ShardBatches(1000, 4, 4, 0, 0, 10)
