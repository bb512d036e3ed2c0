"""Benchmark FMP's feature-map ranking: the plain per-channel reference loop against the fast path,
on the same model and the same inputs, in one run. Prints both times, their ratio, and whether
the flagged channels (and scores) are identical.

    python bench/fmp_rank.py --model resnet20
    python bench/fmp_rank.py --model preactresnet18 --layers 6      # first 6 conv layers only
    python bench/fmp_rank.py --result_file badnet_cifar10           # a trained record's model

Without ``--result_file`` the model has random weights and ranks real CIFAR-10 test images labelled
with its own predictions; with it, the record's model ranks real clean images from its dataset. Not a test: it can take long.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import time

import torch

from bench.profiling import profiled
from models import build_model
from utils.config import resolve_device, run_main, str2bool, synchronize
from utils.data import dataset_spec, load_splits
from utils.evaluate import predict
from utils.fmp import RankSettings, flag_channels, rank_feature_maps, rank_reference
from utils.pruning import conv_layers
from utils.record import load_attack_record, load_record_model, record_folder
from utils import REPO_ROOT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet20', help='registry model with random weights (ignored with --result_file)')
    parser.add_argument('--result_file', default=None, help='rank the model of record/<result_file>/ on its clean data')
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'), help='CIFAR-10 for the random-weights model')
    parser.add_argument('--n_rank', type=int, default=32)
    parser.add_argument('--layers', type=int, default=None, help='rank only the first N conv layers (both paths)')
    parser.add_argument('--channel_chunk', type=int, nargs='+', default=[None],
                        help='fast path chunk; several values time the fast path once each (default: 1 on CPU, 32 on GPU)')
    parser.add_argument('--channels_last', type=str2bool, nargs='+', default=[False],
                        help='fast path in NHWC (RankSettings.channels_last); several values time the fast path once each')
    parser.add_argument('--prune_exponent', type=int, default=6)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--exact', type=str2bool, default=False,
                        help='float32 without TF32 and deterministic cuDNN in both paths (CUDA convolutions default to TF32)')
    parser.add_argument('--float64', type=str2bool, default=False,
                        help='rank in float64 (model, images, buffers): both paths then compute the same numbers up to '
                             'rounding far below the sign decisions FGSM takes, which separates arithmetic from a real difference')
    parser.add_argument('--reference', type=str2bool, default=True,
                        help='time the reference loop too (off: the fast path alone, e.g. to profile it)')
    parser.add_argument('--cudnn_benchmark', type=str2bool, default=False,
                        help='cuDNN autotuning (torch.backends.cudnn.benchmark) in both paths')
    parser.add_argument('--profile', type=str2bool, default=False,
                        help="after the timings, profile one fast ranking: wall time against GPU kernel time and the "
                             'kernels that take it')
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.exact or args.float64:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    if args.float64:
        torch.set_default_dtype(torch.float64)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.result_file:
        record = load_attack_record(record_folder(args.record_root, args.result_file))
        model = load_record_model(record)
        config = record['attack_config']
        train, _ = load_splits(record['dataset'], config['dataset_path'], config.get('train_fraction', 1.0),
                               1.0, config['random_seed'])
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_rank]
        x, y = train.images[pick].float() / 255, train.labels[pick]
        name = f"{record['model_name']} ({args.result_file})"
    else:  # random weights on real test images, labelled with the model's own answers so that
        # the FGSM can only lower accuracy and the scores differ between channels
        spec = dataset_spec('cifar10')
        model = build_model(args.model, spec.num_classes, spec.input_shape, dataset='cifar10')
        _, test = load_splits('cifar10', args.dataset_path)
        x = test.images[:args.n_rank].float() / 255
        y = predict(model, x, torch.device('cpu'))
        name = f'{args.model} (random weights)'
    dtype = torch.float64 if args.float64 else torch.float32
    model = model.to(device, dtype).eval()
    x, y = x.to(device, dtype), y.to(device)
    layers = conv_layers(model, tuple(x.shape[1:]))
    if args.layers:
        layers = layers[:args.layers]
    only = {layer.name for layer in layers}
    channels = sum(layer.channels for layer in layers)
    print(f'{name} on {device}: {len(layers)} conv layers, {channels} feature maps, {args.n_rank} images, '
          f'{torch.get_num_threads()} CPU threads, {dtype}, TF32 convolutions {torch.backends.cudnn.allow_tf32}, '
          f'cuDNN autotuning {torch.backends.cudnn.benchmark}')

    def timed_rank(label, rank, chunk, channels_last=False):
        synchronize(device)
        started = time.perf_counter()
        scores = rank(model, x, y, RankSettings(channel_chunk=chunk, channels_last=channels_last),
                      torch.Generator().manual_seed(args.seed), only=only)
        synchronize(device)
        seconds = time.perf_counter() - started
        print(f'{label:>18}: {seconds:8.2f} s  ({1000 * seconds / channels:.2f} ms per feature map)', flush=True)
        return scores, seconds

    ref, ref_seconds = timed_rank('reference', rank_reference, None) if args.reference else (None, None)
    for chunk, channels_last in ((c, layout) for layout in args.channels_last for c in args.channel_chunk):
        fast, seconds = timed_rank(f'fast (chunk {chunk or "default"}{", NHWC" if channels_last else ""})',
                                   rank_feature_maps, chunk, channels_last)
        if ref is None:
            continue
        same_flags = all(torch.equal(flag_channels(ref[n], prune_exponent=args.prune_exponent),
                                     flag_channels(fast[n], prune_exponent=args.prune_exponent)) for n in ref)
        max_diff = max(float((ref[n] - fast[n]).abs().max()) for n in ref)
        differing = sum(int((ref[n] != fast[n]).sum()) for n in ref)
        print(f'  speed-up (reference / fast): {ref_seconds / seconds:.2f}x; flagged channels identical: {same_flags}; '
              f'scores: max |difference| {max_diff:.4g}, {differing} of {channels} differ')
    if args.profile:
        wall, busy, launches, table = profiled(
            lambda: rank_feature_maps(model, x, y, RankSettings(channel_chunk=args.channel_chunk[-1],
                                                                channels_last=args.channels_last[-1]),
                                      torch.Generator().manual_seed(args.seed), progress=False, only=only), device, 15)
        print(f'profile: {wall:.2f} s wall (profiler on), {busy:.2f} s of GPU kernels in {launches} launches')
        print(table)
    all_scores = torch.cat(list((ref or fast).values()))
    print(f'scores: min {all_scores.min():.3f}, mean {all_scores.mean():.3f}, {len(all_scores.unique())} distinct values '
          '(all equal would make the comparison trivial)')

if __name__ == '__main__':
    sys.exit(run_main(main))
