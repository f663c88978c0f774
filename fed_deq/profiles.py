"""Named devices a tier can start from (``fleet.tiers[].profile``): measured training throughput, link speed and,
where a public figure exists, how often the device drops out. The sources and conversions are in docs/devices.md.

Conventions (docs/devices.md, "Conversions"):

- ``compute_gflops``: sustained training throughput. A published time per training batch becomes FLOP/s as
  ``3 x forward FLOPs x batch / seconds``, with forward FLOPs = 2 x multiply-accumulates (MACs) and the
  backward pass costing twice the forward (the x3 FedScale charges too). Times that include data loading
  make these figures lower bounds.
- ``bandwidth_mbps``: the clock uses one rate for both directions and moves the model once each way, so a
  measured download rate d and upload rate u become their harmonic mean 2du / (d + u): the same total time.
- A figure without a public source is left out (``None``): the tier's own value, or the schema default,
  applies. No profile sets ``availability``: no published per-round reachability exists for these classes.

The registry is read-only; ``fed_deq.scenario`` checks ``profile:`` names against it (``Choice("profile")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

# Tier keys a profile may fill, in the order the scenario schema lists them.
TIER_FIELDS = ("compute_gflops", "bandwidth_mbps", "availability", "dropout")


@dataclass(frozen=True)
class DeviceProfile:
    """One device class: its figures (None where no public source gives one) and a one-line description."""

    description: str
    compute_gflops: float
    bandwidth_mbps: float
    availability: float | None = None
    dropout: float | None = None

    def figures(self) -> dict[str, float]:
        """The tier keys this profile sets, with their values (figures without a source are left out)."""
        values = {name: getattr(self, name) for name in TIER_FIELDS}
        return {name: value for name, value in values.items() if value is not None}


def training_gflops(*, forward_macs: float, batch: int, seconds_per_batch: float) -> float:
    """Sustained training GFLOP/s from a measured time per batch: 3 x (2 x MACs) x batch / seconds / 1e9."""
    return 3.0 * 2.0 * forward_macs * batch / seconds_per_batch / 1e9


def link_mbps(download_mbps: float, upload_mbps: float) -> float:
    """The one symmetric rate that moves a model down and back up in the same time: the harmonic mean."""
    return 2.0 * download_mbps * upload_mbps / (download_mbps + upload_mbps)


# --- the measurements (docs/devices.md cites each) --------------------------------------------------------

#: FEMNIST CNN of FLASH/LEAF (conv 5x5x32, conv 5x5x64, dense 3136x2048, dense 2048x62): MACs per sample.
FEMNIST_CNN_MACS = 28 * 28 * 32 * 25 + 14 * 14 * 64 * 25 * 32 + 3136 * 2048 + 2048 * 62
#: FLASH (PKU-Chengxu/FLASH, models/utils/device_util/device_util.py): ms per FEMNIST training batch of 10.
FLASH_MS_PER_BATCH = {"Google Nexus S": 1642.0, "Xiaomi Redmi Note 7 Pro": 588.0, "Google Pixel 4": 179.0}
FLASH_BATCH = 10
#: ResNet-18 at 224 px (timm): 1.80 GMACs; seconds for 20 training batches of 16 (federated-embedded-vision).
RESNET18_MACS = 1.80e9
RPI_SECONDS_PER_20_BATCHES = {"Raspberry Pi 4": 218.37, "Raspberry Pi 5": 116.85}
#: VGG16-BN at 224 px: 15.47 GMACs; minutes for one CIFAR-10 epoch of 1,406 batches of 32 (rasbt benchmark).
VGG16_MACS = 15.47e9
VGG16_MINUTES_PER_EPOCH = {"Apple M1 Pro CPU": 107.72, "NVIDIA RTX 2080 Ti": 5.75}
#: Speedtest Global Index, September 2020, global medians (Mbit/s): fixed broadband 85.73 down / 45.74 up.
FIXED_BROADBAND = (85.73, 45.74)
#: Phones drop out of 6-10 % of the rounds they were selected for (Bonawitz et al. 2019): the midpoint.
PHONE_DROPOUT = 0.08
#: Gigabit Ethernet line rate: an upper bound for a wired server, not a measurement.
GIGABIT_ETHERNET = 1000.0


def _flash_phone(model: str) -> float:
    return training_gflops(forward_macs=FEMNIST_CNN_MACS, batch=FLASH_BATCH,
                           seconds_per_batch=FLASH_MS_PER_BATCH[model] / 1000.0)


def _raspberry_pi(model: str) -> float:
    return training_gflops(forward_macs=RESNET18_MACS, batch=16,
                           seconds_per_batch=RPI_SECONDS_PER_20_BATCHES[model] / 20.0)


def _vgg16(device: str) -> float:
    return training_gflops(forward_macs=VGG16_MACS, batch=32,
                           seconds_per_batch=VGG16_MINUTES_PER_EPOCH[device] * 60.0 / 1406)


def _round(value: float) -> float:
    """Three significant figures: the measurements carry no more."""
    return float(f"{value:.3g}")


_HOME_LINK = _round(link_mbps(*FIXED_BROADBAND))

PROFILES: Mapping[str, DeviceProfile] = MappingProxyType({
    "phone-low": DeviceProfile(
        "low-end phone: FLASH's slowest device class (labelled Google Nexus S), on home Wi-Fi",
        compute_gflops=_round(_flash_phone("Google Nexus S")), bandwidth_mbps=_HOME_LINK, dropout=PHONE_DROPOUT),
    "phone-mid": DeviceProfile(
        "mid-range phone, Snapdragon 675 class (Xiaomi Redmi Note 7 Pro), on home Wi-Fi",
        compute_gflops=_round(_flash_phone("Xiaomi Redmi Note 7 Pro")), bandwidth_mbps=_HOME_LINK,
        dropout=PHONE_DROPOUT),
    "phone-flagship": DeviceProfile(
        "flagship phone, Snapdragon 855 class (Google Pixel 4), on home Wi-Fi",
        compute_gflops=_round(_flash_phone("Google Pixel 4")), bandwidth_mbps=_HOME_LINK, dropout=PHONE_DROPOUT),
    "rpi-4": DeviceProfile(
        "Raspberry Pi 4 (4-core Cortex-A72), PyTorch on the CPU, on home broadband",
        compute_gflops=_round(_raspberry_pi("Raspberry Pi 4")), bandwidth_mbps=_HOME_LINK),
    "rpi-5": DeviceProfile(
        "Raspberry Pi 5 (4-core Cortex-A76), PyTorch on the CPU, on home broadband",
        compute_gflops=_round(_raspberry_pi("Raspberry Pi 5")), bandwidth_mbps=_HOME_LINK),
    "laptop-cpu": DeviceProfile(
        "laptop CPU (Apple M1 Pro, 10 cores), PyTorch on the CPU, on home broadband",
        compute_gflops=_round(_vgg16("Apple M1 Pro CPU")), bandwidth_mbps=_HOME_LINK),
    "edge-server": DeviceProfile(
        "edge server with one NVIDIA RTX 2080 Ti-class GPU, on a gigabit wired link",
        compute_gflops=_round(_vgg16("NVIDIA RTX 2080 Ti")), bandwidth_mbps=GIGABIT_ETHERNET),
})


def profile_figures(name: Any) -> dict[str, float]:
    """The figures profile ``name`` sets; ``{}`` for anything else (the schema reports an unknown name)."""
    profile = PROFILES.get(name) if isinstance(name, str) else None
    return profile.figures() if profile is not None else {}
