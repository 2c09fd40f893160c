"""Synthetic WebShop catalogues: products, goals (instructions) and a BM25 search engine.

WebShop's real data (1.18M Amazon products, human instructions, a pyserini index) must be downloaded, so the
catalogues are generated from a fixed seed with the same structure: each product has an ASIN, a title, a category
path ("department > aisle > product type"), attributes (e.g. "sulfate free"), option groups (e.g. size, scent)
with their values, a price, a description and features. Goals mirror WebShop's: a product type, attributes, one
value per option group and a price ceiling, phrased as "i am looking for ..., and price lower than 30.00 dollars".

Two catalogues (WebShopEnv's ``catalogue`` option):
- ``realistic`` (the default, ``webshop_families``): goals with 2-15 attributes among several hundred, families of
  near-duplicate products; a crude heuristic solves few goals, as on the real site.
- ``simple`` (this module's :class:`Catalogue`): 23 product types, goals with 1-2 attributes among 104 and no
  near-duplicates; the catalogue before the realistic one, kept for comparison.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

CATALOGUE_SEED = 20251208
PRODUCTS_PER_TYPE = 40

# department -> aisle -> product type -> (attributes, option groups, price range)
_SPEC: dict[str, dict[str, dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[int, int]]]]] = {
    "beauty & personal care": {
        "hair care": {
            "shampoo": (
                ("sulfate free", "paraben free", "for dry hair", "natural ingredients", "color safe"),
                {
                    "size": ("8 fl oz", "12 fl oz", "16 fl oz", "32 fl oz"),
                    "scent": ("lavender", "coconut", "tea tree", "unscented"),
                },
                (6, 38),
            ),
            "hair extension": (
                ("natural looking", "heat resistant", "clip in", "long lasting", "easy to apply"),
                {"color": ("black", "dark brown", "blonde", "auburn"), "length": ("14 inch", "18 inch", "22 inch")},
                (15, 60),
            ),
        },
        "skin care": {
            "face moisturizer": (
                ("oil free", "fragrance free", "for sensitive skin", "with spf 30", "non comedogenic"),
                {"size": ("1.7 oz", "2.5 oz", "4 oz")},
                (9, 45),
            ),
            "lip balm": (
                ("long lasting", "cruelty free", "with shea butter", "tinted", "vegan"),
                {"flavor": ("mint", "vanilla", "cherry", "honey"), "pack": ("pack of 2", "pack of 4", "pack of 6")},
                (3, 18),
            ),
        },
        "personal care": {
            "deodorant": (
                ("aluminum free", "long lasting", "natural ingredients", "for sensitive skin", "travel size"),
                {"scent": ("citrus", "cedar", "rose", "unscented"), "pack": ("pack of 1", "pack of 2", "pack of 3")},
                (4, 22),
            ),
        },
    },
    "clothing, shoes & jewelry": {
        "men": {
            "t-shirt": (
                ("cotton", "slim fit", "machine washable", "short sleeve", "moisture wicking"),
                {"color": ("white", "navy", "heather grey", "olive"), "size": ("small", "medium", "large", "x-large")},
                (8, 35),
            ),
            "running shoes": (
                ("lightweight", "non slip", "breathable mesh", "arch support", "wide fit"),
                {"color": ("black white", "blue", "grey", "red"), "size": ("8", "9", "10", "11", "12")},
                (30, 120),
            ),
        },
        "women": {
            "sundress": (
                ("floral print", "with pockets", "sleeveless", "loose fit", "knee length"),
                {"color": ("yellow", "sky blue", "pink", "black"), "size": ("x-small", "small", "medium", "large")},
                (18, 55),
            ),
            "yoga pants": (
                ("high waist", "tummy control", "squat proof", "with pockets", "quick drying"),
                {"color": ("black", "charcoal", "burgundy", "teal"), "size": ("small", "medium", "large")},
                (14, 48),
            ),
        },
        "jewelry": {
            "necklace": (
                ("sterling silver", "hypoallergenic", "gift box", "adjustable chain", "gold plated"),
                {"length": ("16 inch", "18 inch", "20 inch")},
                (12, 80),
            ),
        },
    },
    "electronics": {
        "audio": {
            "wireless earbuds": (
                ("noise cancelling", "water resistant", "long battery life", "with charging case", "bluetooth 5.3"),
                {"color": ("black", "white", "navy blue")},
                (20, 150),
            ),
            "bluetooth speaker": (
                ("portable", "waterproof", "with deep bass", "long battery life", "with microphone"),
                {"color": ("black", "red", "blue", "camo")},
                (18, 120),
            ),
        },
        "accessories": {
            "phone case": (
                ("shockproof", "slim", "with card holder", "clear", "wireless charging compatible"),
                {"color": ("clear", "black", "purple", "green"), "model": ("iphone 14", "iphone 15", "galaxy s23")},
                (7, 30),
            ),
            "usb c cable": (
                ("fast charging", "braided", "durable", "6 ft", "data transfer"),
                {"length": ("3 ft", "6 ft", "10 ft"), "pack": ("pack of 1", "pack of 2", "pack of 3")},
                (5, 25),
            ),
            "power bank": (
                ("high capacity", "fast charging", "compact", "with led display", "dual usb"),
                {"capacity": ("10000mah", "20000mah", "26800mah")},
                (15, 70),
            ),
        },
    },
    "grocery & gourmet food": {
        "beverages": {
            "ground coffee": (
                ("organic", "medium roast", "fair trade", "dark roast", "low acid"),
                {"size": ("12 ounce", "24 ounce", "2 pound"), "flavor": ("original", "hazelnut", "french vanilla")},
                (7, 35),
            ),
            "green tea": (
                ("organic", "caffeine free", "non gmo", "individually wrapped", "gluten free"),
                {"flavor": ("jasmine", "matcha", "mint", "lemon"), "pack": ("20 count", "50 count", "100 count")},
                (4, 25),
            ),
        },
        "snacks": {
            "protein bar": (
                ("gluten free", "low sugar", "high protein", "keto friendly", "plant based"),
                {
                    "flavor": ("chocolate peanut butter", "cookie dough", "berry", "salted caramel"),
                    "pack": ("12 count", "24 count"),
                },
                (12, 45),
            ),
            "trail mix": (
                ("non gmo", "no added sugar", "resealable bag", "kosher", "individually packed"),
                {"size": ("1 pound", "2 pound", "3 pound")},
                (6, 30),
            ),
        },
    },
    "home & kitchen": {
        "bedding": {
            "throw pillow cover": (
                ("soft velvet", "machine washable", "hidden zipper", "decorative", "set of 2"),
                {"color": ("mustard", "emerald", "blush", "cream"), "size": ("18 x 18 inch", "20 x 20 inch")},
                (8, 30),
            ),
            "bath towel": (
                ("quick dry", "highly absorbent", "100% cotton", "oversized", "soft"),
                {"color": ("white", "grey", "aqua", "beige"), "pack": ("set of 2", "set of 4", "set of 6")},
                (15, 60),
            ),
        },
        "furniture & decor": {
            "desk lamp": (
                ("dimmable", "with usb port", "eye caring", "touch control", "energy saving"),
                {"color": ("black", "white", "silver")},
                (16, 60),
            ),
            "storage bin": (
                ("foldable", "with handles", "stackable", "with lid", "fabric"),
                {"color": ("grey", "beige", "navy"), "pack": ("pack of 3", "pack of 6")},
                (12, 45),
            ),
        },
    },
}

_BRANDS = (
    "Amazon Basics", "Acorn", "Brightline", "Cedar & Co", "Dovetail", "Evergreen", "Fieldstone", "Greyson", "Harbor",
    "Iris Lane", "Juniper", "Kestrel", "Lumen", "Maple Row", "Northwind", "Oakridge", "Pinecrest", "Quill",
    "Riverside", "Summit", "Tidewater", "Umbra", "Vantage", "Willow", "Yardley", "Zenith",
)  # fmt: skip
_ADJECTIVES = ("Premium", "Classic", "Everyday", "Ultra", "Essential", "Pro", "Original", "Deluxe")


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    department: str
    aisle: str
    product_type: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]  # (group, values)
    price: float
    description: str
    features: tuple[str, ...]

    @property
    def category(self) -> tuple[str, str, str]:
        return (self.department, self.aisle, self.product_type)

    def option_groups(self) -> dict[str, tuple[str, ...]]:
        return dict(self.options)


@dataclass(frozen=True)
class Goal:
    instruction: str
    product_type: str
    category: tuple[str, str, str]
    attributes: tuple[str, ...]
    options: tuple[tuple[str, str], ...]  # (group, value)
    price_upper: float
    target_asin: str = field(compare=False)


class SearchIndex:
    """BM25 over each product's title, type, attributes, aisle and description (options and price are not
    indexed, as in WebShop); subclasses set ``products`` and ``by_asin`` and call ``_build_index``."""

    products: tuple[Product, ...]
    by_asin: dict[str, Product]

    def _doc_text(self, p: Product) -> str:
        return " ".join([p.title, p.product_type, " ".join(p.attributes), p.aisle, p.description])

    def _build_index(self, k1: float = 1.2, b: float = 0.75) -> None:
        self._k1, self._b = k1, b
        self._tf: list[Counter] = [Counter(tokenize(self._doc_text(p))) for p in self.products]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / len(self._len)
        df: Counter = Counter()
        postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self._tf):
            for term in tf:
                df[term] += 1
                postings.setdefault(term, []).append(i)
        n = len(self.products)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self._postings = postings

    def search(self, query: str, limit: int = 50) -> list[Product]:
        """BM25 ranking (ties by catalogue order); at most ``limit`` results, as WebShop returns its top 50."""
        scores: dict[int, float] = {}
        for term in set(tokenize(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for i in self._postings[term]:
                f = self._tf[i][term]
                norm = f * (self._k1 + 1) / (f + self._k1 * (1 - self._b + self._b * self._len[i] / self._avg))
                scores[i] = scores.get(i, 0.0) + idf * norm
        ranked = sorted(scores, key=lambda i: (-scores[i], i))[:limit]
        return [self.products[i] for i in ranked]

    def goal(self, task_id: int) -> Goal:
        raise NotImplementedError


class Catalogue(SearchIndex):
    """The ``simple`` catalogue (see the module docstring)."""

    def __init__(self, seed: int = CATALOGUE_SEED, per_type: int = PRODUCTS_PER_TYPE):
        rng = random.Random(seed)
        products: list[Product] = []
        used: set[str] = set()
        for dept, aisles in _SPEC.items():
            for aisle, types in aisles.items():
                for ptype, (attrs, groups, (lo, hi)) in types.items():
                    for _ in range(per_type):
                        asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
                        while asin in used:
                            asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
                        used.add(asin)
                        brand = rng.choice(_BRANDS)
                        n_attrs = rng.randint(2, 3)
                        p_attrs = tuple(sorted(rng.sample(attrs, n_attrs)))
                        p_options = []
                        for g, values in groups.items():
                            keep = set(rng.sample(values, rng.randint(2, len(values))))
                            p_options.append((g, tuple(v for v in values if v in keep)))
                        p_options = tuple(p_options)
                        price = round(rng.uniform(lo, hi), 2)
                        shown = rng.sample(p_attrs, min(2, len(p_attrs)))
                        shown_text = ", ".join(a.title() for a in shown)
                        title = f"{brand} {rng.choice(_ADJECTIVES)} {ptype.title()}, {shown_text}"
                        description = (
                            f"This {ptype} from {brand} is {' and '.join(p_attrs)}. "
                            f"A {rng.choice(_ADJECTIVES).lower()} choice for everyday use."
                        )
                        features = tuple(f"{a.capitalize()}." for a in p_attrs)
                        products.append(
                            Product(asin, title, dept, aisle, ptype, p_attrs, p_options, price, description, features)
                        )
        self.products: tuple[Product, ...] = tuple(products)
        self.by_asin = {p.asin: p for p in self.products}
        self._build_index()

    # -- goals -----------------------------------------------------------------------------------------------

    def goal(self, task_id: int) -> Goal:
        rng = random.Random(f"webshop-goal/{task_id}")
        target = rng.choice(self.products)
        attrs = tuple(sorted(rng.sample(target.attributes, rng.randint(1, 2))))
        options = tuple((g, rng.choice(values)) for g, values in target.options)
        ceiling = math.ceil(target.price * rng.uniform(1.05, 1.6) / 10) * 10
        return Goal(
            instruction=_phrase(rng, target.product_type, attrs, options, ceiling),
            product_type=target.product_type,
            category=target.category,
            attributes=attrs,
            options=options,
            price_upper=float(ceiling),
            target_asin=target.asin,
        )


def _phrase(rng: random.Random, ptype: str, attrs, options, ceiling: float) -> str:
    opener = rng.choice(("i am looking for", "i need", "i want to buy", "find me"))
    attr_text = " and ".join(attrs)
    opt_parts = []
    for group, value in options:
        if group in ("color", "flavor", "scent"):
            opt_parts.append(f"{value} {group}")
        elif group == "pack":
            opt_parts.append(value)
        else:
            opt_parts.append(f"{group} {value}")
    article = "an" if ptype[:1] in "aeiou" else "a"
    text = f"{opener} {article} {ptype}, {attr_text}"
    if opt_parts:
        text += ", with " + " and ".join(opt_parts)
    return f"{text}, and price lower than {ceiling:.2f} dollars"


CATALOGUES = ("realistic", "simple")


@lru_cache(maxsize=2)
def catalogue(name: str = "realistic") -> SearchIndex:
    if name == "simple":
        return Catalogue()
    if name == "realistic":
        from fedse_secure.envs.webshop_families import FamilyCatalogue

        return FamilyCatalogue()
    raise ValueError(f"catalogue must be one of {', '.join(CATALOGUES)}, got {name!r}")
