"""Per-channel normalisation constants (training-set statistics of [0, 1] pixels)."""

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Computed from the 1,400 training images of load_digits_data()'s fixed split (pixels / 16);
# tests recompute them, so a change to the split shows up as a failing test.
DIGITS_MEAN = (0.3049,)
DIGITS_STD = (0.3759,)
# Synthetic images mix two uniform fields (0.7 * pattern + 0.3 * noise): mean 0.5,
# std sqrt(0.7**2 + 0.3**2) / sqrt(12) ~= 0.22.
SYNTHETIC_MEAN = 0.5
SYNTHETIC_STD = 0.22
