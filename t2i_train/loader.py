"""The training loader: aspect-ratio buckets, batches planned ahead from the run's seed (each sample
with a seed of its own), the sampler and the stream, the DataLoader and its state, and the latent cache.

The loader's position is saved in every checkpoint (TrainingBatches: the sampler's for map-style data,
torchdata's StatefulDataLoader's for a stream): a resumed run continues exactly where it stopped."""

import collections
import copy
import hashlib
import itertools
import json
import math
import os
import shutil
import signal

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import Image as ImageFeature
from datasets import concatenate_datasets
from datasets.distributed import split_dataset_by_node
from safetensors.torch import load_file, save_file
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm

from .data import inspect_sample, refuse_or_skip, stored_sample, undecoded_images
from .files import follow_umask, replaced_atomically
from .images import load_upright_rgb
from .stopping import STOP_SIGNALS, Refusal

logger = get_logger(__name__)

LATENT_CACHE_VERSION = "2"  # part of each cached latent's key: bump when what is encoded of an image changes


def aspect_ratio_buckets(resolution, multiple, max_aspect_ratio=4.0):
    """SDXL's bucket list scaled to `resolution`: for each short side, the longest long side that
    keeps the area within resolution² (so no bucket costs more memory than the square), in both
    orientations; sides are multiples of the step (64 at 1024², as SDXL's own list; at least the
    adapter's downscale `multiple`), aspect ratios from 1:4 to 4:1."""
    step = max(multiple, resolution // 16 // multiple * multiple)
    buckets = set()
    for short in range(step, resolution + 1, step):
        long = resolution * resolution // short // step * step
        if long / short <= max_aspect_ratio:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets)


def nearest_bucket(height, width, buckets):
    """The bucket whose aspect ratio is closest to the image's (compared in log space)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def target_size(size, resolution, buckets=None):
    """The size a (height, width) image trains at: its nearest bucket with --aspect_ratio_buckets, else
    the square resolution. The one rule, for loaded data and streams alike."""
    return nearest_bucket(*size, buckets) if buckets else (resolution, resolution)


def row_targets(sizes, args, multiple):
    """Each row's target size, from its (height, width): the sampler plans by them, the cache encodes at them.
    `multiple` is the adapter's total downscale (bucket sides are multiples of it)."""
    buckets = aspect_ratio_buckets(args.resolution, multiple) if args.aspect_ratio_buckets else None
    return [target_size(size, args.resolution, buckets) for size in sizes]


def latent_cache_conflicts(args):
    """The flags the latent cache cannot be combined with (a stream, read once): for the trainer's check
    and the memory planner's suggestions alike."""
    return ["--streaming"] if args.streaming else []


def plan_batches(targets, batch_size, rng):
    """Batches of positions into `targets` (each position's target size), in `rng`'s random order,
    each batch of one target size; a bucket's last batch may be smaller."""
    by_target = {}
    for position in rng.permutation(len(targets)).tolist():
        by_target.setdefault(tuple(targets[position]), []).append(position)
    batches = [
        positions[start : start + batch_size]
        for positions in by_target.values()
        for start in range(0, len(positions), batch_size)
    ]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def collate_fn(examples):
    """Stack the tensors of a batch; keep the rest (captions, seeds) as lists. Samples skipped mid-training
    (None) are left out; a batch needs one left, since every process must take each step."""
    examples = [example for example in examples if example is not None]
    if not examples:
        raise Refusal("Every sample of a batch failed mid-training (see the warnings above).")
    return {
        key: torch.stack([e[key] for e in examples]).float() if torch.is_tensor(value) else [e[key] for e in examples]
        for key, value in examples[0].items()
    }


def default_latent_cache_dir(args):
    if args.latent_cache_dir is not None:
        return args.latent_cache_dir
    base = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "t2i-adapter-sdxl")
    return os.path.join(base, "latents")


def vae_fingerprint(vae):
    """A digest of the VAE's config and weights: cached latents are only valid for this VAE."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def stored_image_bytes(value):
    if value.get("bytes") is not None:
        return value["bytes"]
    with open(value["path"], "rb") as f:
        return f.read()


def latent_cache_keys(dataset, image_column, vae_id, targets, layout):
    """One key per row: the image's stored bytes, the VAE, the row's target size and what the cache
    encodes of the image (`layout`: the centre crop or the region random crops are cut from, flipped too)."""
    stored = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    keys = []
    for sample, (height, width) in zip(stored, targets):
        digest = hashlib.sha256(stored_image_bytes(sample[image_column]))
        digest.update(f"|{vae_id}|{height}x{width}|{layout}|{LATENT_CACHE_VERSION}".encode())
        keys.append(digest.hexdigest())
    return keys


def latent_cache_path(cache_dir, key):
    return os.path.join(cache_dir, key[:2], f"{key}.safetensors")


def load_cached_latents(path):
    return load_file(path)


class ImageRegions(torch.utils.data.Dataset):
    """(row, {prefix: VAE input}) of each row to encode, decoded and cropped in DataLoader workers."""

    def __init__(self, images, image_column, rows, targets, regions_of):
        self.images, self.image_column, self.rows, self.targets = images, image_column, rows, targets
        self.regions_of = regions_of

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        return row, self.regions_of(load_upright_rgb(self.images[row][self.image_column]), self.targets[row])


@torch.no_grad()
def fill_latent_cache(dataset, keys, targets, vae, args, accelerator, cache_dir, regions_of, chunk_size=8):
    """Encode every image whose latent distribution is not cached yet, as `regions_of(image, target size)`
    makes it the VAE's input ({prefix: pixels}: the trainer's crop, and its flip), stored as float16
    `<prefix>mean` and `<prefix>std` in one file per image. The processes split what is missing, and
    each one's DataLoader workers decode and crop its share. A cache folder local to each node holds
    only its own processes' shares after that: the node's processes then split what they still cannot
    find (torchrun's LOCAL_WORLD_SIZE says how many share the node). Returns how many this process
    encoded; an interrupted fill keeps every file it finished."""
    images = undecoded_images(dataset.select_columns([args.image_column]), args)

    def missing(rows):
        return [row for row in rows if not os.path.exists(latent_cache_path(cache_dir, keys[row]))]

    def encode(rows):
        chunks = torch.utils.data.DataLoader(
            ImageRegions(images, args.image_column, rows, targets, regions_of), batch_size=chunk_size,
            collate_fn=list, num_workers=args.dataloader_num_workers if rows else 0,
            worker_init_fn=leave_stop_signals_to_the_main_process)
        progress = tqdm(total=len(rows), desc="Caching latents", disable=not accelerator.is_local_main_process)
        for chunk in chunks:
            regions = [(row, prefix, pixels) for row, regions_of_row in chunk for prefix, pixels in regions_of_row.items()]
            entries = collections.defaultdict(dict)
            for shape in dict.fromkeys(pixels.shape for _, _, pixels in regions):  # one encode per shape
                alike = [(row, prefix, pixels) for row, prefix, pixels in regions if pixels.shape == shape]
                stacked = torch.stack([pixels for _, _, pixels in alike]).to(vae.device, dtype=vae.dtype)
                distribution = vae.encode(stacked).latent_dist
                for (row, prefix, _), mean, std in zip(alike, distribution.mean, distribution.std):
                    entries[row][prefix + "mean"] = mean.half().cpu().contiguous()
                    entries[row][prefix + "std"] = std.half().cpu().contiguous()
            for row, entry in entries.items():
                path = latent_cache_path(cache_dir, keys[row])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with replaced_atomically(path) as tmp_path:  # readers never see a partial file
                    save_file(entry, tmp_path)
                    follow_umask(tmp_path)
            progress.update(len(chunk))
        progress.close()
        return len(rows)

    encoded = encode(missing(range(len(keys)))[accelerator.process_index :: accelerator.num_processes])
    accelerator.wait_for_everyone()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    encoded += encode(missing(range(len(keys)))[accelerator.local_process_index :: local_processes])  # none when shared
    accelerator.wait_for_everyone()
    return encoded


SAFETENSORS_BYTES_PER_TENSOR = 72  # a tensor's entry in the file's JSON header, about (its name, dtype, shape, offsets)


def latent_entry_bytes(region_sizes, latent_channels, vae_downscale):
    """The bytes of one image's cache file: a float16 mean and std for each region of `region_sizes`
    ((height, width) in pixels), and their entries in the file's header."""
    return sum(2 * (2 * latent_channels * (height // vae_downscale) * (width // vae_downscale)
                    + SAFETENSORS_BYTES_PER_TENSOR) for height, width in region_sizes)


def free_bytes(folder):
    """Free space on the disk that holds `folder`, or would hold it once created."""
    while not os.path.exists(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    return shutil.disk_usage(folder).free


def readable_bytes(size):
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def check_latent_cache_space(cache_dir, keys, sizes, targets, region_sizes_of, vae_config):
    """Say how much the cache fill will write, before it starts, and refuse a fill that the disk cannot
    hold (nothing is encoded then). `region_sizes_of(height, width, target size)` gives the (height, width)
    of each region the cache encodes of such an image."""
    vae_downscale = 2 ** (len(vae_config.block_out_channels) - 1)
    missing = [row for row, key in enumerate(keys) if not os.path.exists(latent_cache_path(cache_dir, key))]
    needed = sum(latent_entry_bytes(region_sizes_of(*sizes[row], targets[row]), vae_config.latent_channels,
                                    vae_downscale) for row in missing)
    free = free_bytes(cache_dir)
    logger.info(f"Latent cache {cache_dir}: {len(keys) - len(missing)} of {len(keys)} images cached;"
                f" encoding {len(missing)} will write about {readable_bytes(needed)} ({readable_bytes(free)} free there).")
    if needed > free:
        raise Refusal(f"The latent cache needs about {readable_bytes(needed)} in {cache_dir} for {len(missing)} images,"
                      f" but only {readable_bytes(free)} are free there: free some space, or give --latent_cache_dir"
                      " on a larger disk.")


def cache_latents(train_data, layout, vae, args, accelerator, regions_of, region_sizes_of, multiple):
    """Fill the latent cache for the training data, each image as `regions_of(image, target size)` makes
    it (described by `layout`; `region_sizes_of` gives its regions' sizes without decoding it), and return
    each row's latent file."""
    cache_dir, dataset = default_latent_cache_dir(args), train_data.dataset
    targets = row_targets(train_data.sizes, args, multiple)
    keys = latent_cache_keys(dataset, args.image_column, vae_fingerprint(vae), targets, layout)
    check_latent_cache_space(cache_dir, keys, train_data.sizes, targets, region_sizes_of, vae.config)
    encoded = fill_latent_cache(dataset, keys, targets, vae, args, accelerator, cache_dir, regions_of)
    logger.info(f"Latent cache {cache_dir}: {len(keys)} images, {encoded} newly encoded on this process.")
    return [latent_cache_path(cache_dir, key) for key in keys]


class PlannedBatchSampler:
    """Endless micro-batches of (row, target size, seed) over a map-style dataset, this process's share
    of each total batch.

    Each epoch is planned as a whole from (seed, epoch): a permutation, then total batches of
    `total_batch` samples, each of one target size, each sample with a seed of its own; a bucket's last,
    incomplete total batch is left out of the epoch. A total batch is one optimisation step: it is cut into
    `total_batch // batch_size` micro-batches, and process `rank` takes every `world_size`-th of them
    (its accumulation steps). So the samples of a step, and each one's randomness, depend on the total
    batch only, not on how many processes and accumulation steps carry it. The position is (epoch, total
    batches done)."""

    def __init__(self, targets, total_batch, batch_size, seed, rank=0, world_size=1):
        if total_batch % (batch_size * world_size):
            raise Refusal(f"A total batch of {total_batch} is not {world_size} processes × {batch_size}.")
        self.targets, self.total_batch, self.batch_size, self.seed = targets, total_batch, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.micro_batches = total_batch // (batch_size * world_size)  # this process's, each step
        self.epoch, self.done = 0, 0

    def epoch_plan(self, epoch):
        """The epoch's total batches, each a list of (row, target size, seed)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = plan_batches(self.targets, self.total_batch, rng)
        sample_seeds = rng.integers(2**63, size=len(self.targets)).tolist()
        return [[(row, tuple(self.targets[row]), sample_seeds[row]) for row in batch]
                for batch in batches if len(batch) == self.total_batch]

    def steps_per_epoch(self):
        """The whole total batches each target size fills: the same every epoch, without planning one."""
        return sum(count // self.total_batch for count in collections.Counter(map(tuple, self.targets)).values())

    def share(self, batch):
        """This process's micro-batches of a total batch, in the order it takes them."""
        size = self.batch_size
        return [batch[slot * size:(slot + 1) * size]
                for slot in range(self.rank, self.total_batch // size, self.world_size)]

    def __iter__(self):
        while True:
            plan = self.epoch_plan(self.epoch)
            while self.done < len(plan):
                self.done += 1
                yield from self.share(plan[self.done - 1])
            self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = state["epoch"], state["done"]


class PlannedPairs(torch.utils.data.Dataset):
    """A map-style dataset indexed by the sampler's (row, target size, seed); with the latent cache,
    each row's cached latent distribution is read from `latent_files[row]`.

    Every sample passed the sample check, but a file can change after it (and its record). A sample
    that then fails stops the run naming the file and the record to delete, or with
    `skip_bad_samples` is left out of its batch (None, which `collate_fn` drops) with a warning."""

    def __init__(self, dataset, transform, latent_files=None, skip_bad_samples=False):
        self.dataset, self.transform, self.latent_files = dataset, transform, latent_files
        self.skip_bad_samples = skip_bad_samples

    def __getitem__(self, key):
        row, target_size, seed = key
        sample = self.dataset[row]
        try:
            cached = None if self.latent_files is None else load_cached_latents(self.latent_files[row])
            return self.transform(sample, target_size, seed, cached)
        except Exception as error:
            files = [value["path"] for value in sample.values() if isinstance(value, dict) and value.get("path")]
            records = os.path.dirname(self.dataset.cache_files[0]["filename"]) if self.dataset.cache_files else None
            problem = (
                f"Training sample at row {row} ({', '.join(files) or 'stored in the dataset'}) failed mid-training:"
                f" {type(error).__name__}: {error}. It passed the sample check, so a file changed since"
            )
            record = f" and delete the check's record (t2i_sample_check-*.json in {records})" if records else ""
            refuse_or_skip(problem, self.skip_bad_samples, f"Fix it{record}, then start again", error)
            return None


class StreamingBatches(torch.utils.data.IterableDataset):
    """Endless batches from a `datasets` IterableDataset (--streaming).

    Each epoch reads the shards in a new order (from the seed and epoch), each process its own
    shards (datasets' split_dataset_by_node) and each DataLoader worker its own part of those.
    Samples are taken in windows of --shuffle_buffer_size, checked, shuffled and grouped by
    bucket. The state is the stream's position at the start of the current window plus the
    batches already given from it: a resumed run re-reads that one window and continues exactly
    (datasets' own shuffle buffer is not saved in its state_dict, so it is not used).
    """

    def __init__(self, stream, transform, args, seed, rank=0, world_size=1, buckets=None):
        self.stream, self.transform, self.args, self.seed = stream, transform, args, seed
        self.rank, self.world_size, self.buckets = rank, world_size, buckets
        self.state = {"epoch": 0, "window": 0, "stream": None, "done": 0}

    def epoch_stream(self, epoch):
        num_shards = self.stream.num_shards
        order = np.random.default_rng([self.seed, epoch]).permutation(num_shards).tolist()
        stream = concatenate_datasets([self.stream.shard(num_shards, index) for index in order])
        return split_dataset_by_node(stream, self.rank, self.world_size)

    def window_batches(self, window, rng):
        """Check the window's samples, then plan its batches: (sample, target size, seed) lists."""
        good, targets = [], []
        for sample in window:
            problem, size = inspect_sample(*stored_sample(sample, self.args))
            if problem is not None:
                refuse_or_skip(f"Bad training sample {sample.get('__key__', '?')!r}: {problem}", self.args.skip_bad_samples)
                continue
            good.append(sample)
            targets.append(target_size(size, self.args.resolution, self.buckets))
        seeds = rng.integers(2**63, size=len(good)).tolist()
        return [
            [(good[i], targets[i], seeds[i]) for i in batch]
            for batch in plan_batches(targets, self.args.train_batch_size, rng)
        ]

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        state = dict(self.state)
        while True:
            stream = self.epoch_stream(state["epoch"])
            if state["stream"] is not None:
                stream.load_state_dict(state["stream"])
            samples = iter(stream)
            while True:
                window = list(itertools.islice(samples, self.args.shuffle_buffer_size))
                if not window:
                    if state["window"] == 0 and state["stream"] is None:  # a whole epoch gave this reader nothing
                        self.nothing_to_read(worker)
                        return
                    break
                rng = np.random.default_rng([self.seed, state["epoch"], self.rank, worker_id, state["window"]])
                for done, batch in enumerate(self.window_batches(window, rng), start=1):
                    if done > state["done"]:  # the others were given before the checkpoint resumed from
                        self.state = {**state, "done": done}
                        yield collate_fn([self.transform(sample, target, seed) for sample, target, seed in batch])
                state = {**state, "window": state["window"] + 1, "stream": stream.state_dict(), "done": 0}
            state = {"epoch": state["epoch"] + 1, "window": 0, "stream": None, "done": 0}

    def state_dict(self):
        return copy.deepcopy(self.state)

    def load_state_dict(self, state):
        self.state = copy.deepcopy(state)

    def nothing_to_read(self, worker):
        """A DataLoader worker with no share of the stream (more workers than this process's shards)
        stops, as `datasets` stops it, and the other workers go on; a process with nothing to read
        is an error. Looping to the next epoch instead would spin for ever and hang the loader."""
        if worker is not None and worker.num_workers > 1:
            logger.warning(f"DataLoader worker {worker.id} of process {self.rank} has no shard of the stream to read;"
                           " it stops (use fewer --dataloader_num_workers, or more shards).", main_process_only=False)
            return
        raise Refusal(f"Process {self.rank} of {self.world_size} has no sample of the stream to read: the stream"
                         " has fewer samples than processes.")


def leave_stop_signals_to_the_main_process(worker_id):
    """DataLoader workers ignore the stop signals. A cluster's preemption (scancel, pod eviction) and
    Ctrl-C signal the whole process group; a worker that died of it would end the run before the main
    process saves its checkpoint. The main process stops the workers when it exits, and kills them when
    it fails (stopping.workers_ended_on_error)."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def loader_options(args, seed):
    """DataLoader settings: workers that leave stop signals to the main process, pinned memory on CUDA,
    and a generator of its own, so that creating an iterator never draws from the global torch RNG (a
    resumed run, which creates its iterator at another moment, would otherwise draw other noise than
    the uninterrupted run)."""
    return {
        "num_workers": args.dataloader_num_workers,
        "persistent_workers": args.dataloader_num_workers > 0,
        "worker_init_fn": leave_stop_signals_to_the_main_process,
        "pin_memory": torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(seed),
    }


class TrainingBatches:
    """The training loop's batches and its position in them, which each checkpoint saves.

    Over a map-style dataset the position is the sampler's (epoch, total batches done) of the batches the
    loop has taken, counted here as they arrive: the DataLoader's workers read ahead, but nothing they hold
    is part of it. It is the same on every process and for every layout of the total batch, so a run
    resumes exactly with any number of processes, accumulation steps and workers. A stream's position lives
    in its workers (each reads its own shards), so it is torchdata's state of this process's DataLoader."""

    def __init__(self, dataloader, sampler=None):
        self.dataloader, self.sampler = dataloader, sampler
        self.epoch, self.done = 0, 0

    def __iter__(self):
        if self.sampler is None:
            yield from self.dataloader
            return
        self.sampler.load_state_dict({"epoch": self.epoch, "done": self.done})
        steps_per_epoch, taken = self.sampler.steps_per_epoch(), 0
        for batch in self.dataloader:
            taken += 1
            if taken == self.sampler.micro_batches:  # the last micro-batch of a total batch
                taken, self.done = 0, self.done + 1
                if self.done == steps_per_epoch:
                    self.epoch, self.done = self.epoch + 1, 0
            yield batch

    def state_dict(self):
        if self.sampler is None:
            return self.dataloader.state_dict()
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state, most_steps=None):
        """Continue from a saved position of a map-style dataset, which may not lie beyond an epoch's end or
        beyond the `most_steps` the run had taken by then."""
        if self.sampler is None:
            self.dataloader.load_state_dict(state)
            return
        epoch, done = state["epoch"], state["done"]
        steps_per_epoch = self.sampler.steps_per_epoch()
        if done > steps_per_epoch:
            raise Refusal(f'"done" is {done}, more than the {steps_per_epoch} total batches of an epoch')
        if most_steps is not None and epoch * steps_per_epoch + done > most_steps:
            raise Refusal(f'"epoch" {epoch} and "done" {done} are {epoch * steps_per_epoch + done} total batches'
                             f" of {steps_per_epoch} an epoch, more than the {most_steps} steps the run took by then")
        self.epoch, self.done = epoch, done


def make_train_dataloader(train_data, transform, args, seed, rank, world_size, total_batch, multiple,
                          latent_files=None):
    """The training batches, for a map-style dataset or a stream: a StatefulDataLoader over planned
    batches, in TrainingBatches. Every process builds its own share (it is not passed to
    accelerate.prepare), and its position goes into each checkpoint.

    `train_data` is what `load_training_data` returns; `total_batch` is the samples of one optimisation
    step (lifecycle.total_batch); `multiple` is the adapter's total downscale (bucket sides are multiples
    of it). Returns (TrainingBatches, optimisation steps an epoch, or None for a stream).
    """
    dataset, sizes = train_data.dataset, train_data.sizes
    buckets = aspect_ratio_buckets(args.resolution, multiple) if args.aspect_ratio_buckets else None
    if train_data.streamed:  # it yields whole batches
        batches = StreamingBatches(dataset, transform, args, seed, rank, world_size, buckets)
        return TrainingBatches(StatefulDataLoader(batches, batch_size=None, **loader_options(args, seed))), None
    targets = row_targets(sizes, args, multiple)
    sampler = PlannedBatchSampler(targets, total_batch, args.train_batch_size, seed, rank, world_size)
    steps_per_epoch = sampler.steps_per_epoch()
    if steps_per_epoch == 0:
        what = "in any aspect-ratio bucket" if buckets else "of the training set"
        raise Refusal(f"{len(sizes)} samples make no total batch of {total_batch} {what}"
                         " (--train_batch_size × processes × --gradient_accumulation_steps).")
    left_out = len(sizes) - steps_per_epoch * total_batch
    if left_out:
        last = "each bucket's last total batch" if buckets else "the last total batch"
        logger.info(f"Each epoch trains {len(sizes) - left_out} of the {len(sizes)} samples: {last} is incomplete, and"
                    f" left out (other samples each epoch, as each epoch is shuffled anew).")
    pairs = PlannedPairs(undecoded_images(dataset, args), transform, latent_files, args.skip_bad_samples)
    loader = StatefulDataLoader(pairs, batch_sampler=sampler, collate_fn=collate_fn, **loader_options(args, seed))
    return TrainingBatches(loader, sampler), steps_per_epoch
