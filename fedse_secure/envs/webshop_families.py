"""WebShop's default catalogue: product families whose goals have real WebShop's shape and difficulty.

Real WebShop goals (AgentGym serves 1,000 products with their human-annotated attributes) ask for 2-15
attributes each, several hundred distinct ones overall, one value per option group (colour and size together,
say) and a price ceiling, and the shop is full of near-duplicates: its rule baseline (search the instruction, open
the first hit, buy) reaches a 9.6% success rate. ``webshop_catalog.Catalogue`` (the ``simple`` catalogue) asks for
1-2 attributes among 104 and a crude heuristic solves 60% of its test goals. This catalogue is built so that the
same heuristic fails for the reasons it fails on the real site:

- 47 product types in 5 departments; attributes come from the department's pool (shared by its types) and the
  type's own, 409 distinct in all; a goal asks for 2-15 of its family's attributes (mostly 2-6).
- Products come in families of ``FAMILY_SIZE`` near-duplicates (same brand, same product line, the family's
  attributes, a few extras each) that differ in price and in which option values they offer. A goal picks a
  family and asks for some of its attributes; its target member, option values and price ceiling are the ones
  the fewest siblings also satisfy, and since neither price nor options are in the search text, the siblings
  rank with the target.
  Seeing which hit fits takes reading prices on the results page and options on the item page.
- Families of the same type share many attributes, so other families fill the rest of the results.

What still differs from real WebShop: titles, descriptions and instructions are generated from templates, not
written by people; attributes match exactly (WebShop matches them fuzzily against the product's text); there are
no reviews or ratings; the search engine is BM25 over title, type, attributes, aisle and description (WebShop
indexes its products' text with pyserini); and a family's members share one title apart from a model code.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from fedse_secure.envs.webshop_catalog import Goal, Product, SearchIndex

CATALOGUE_SEED = 20251209
FAMILIES_PER_TYPE = 4
FAMILY_SIZE = 12

# department -> (shared attribute pool, {aisle: {type: (own attributes, {option group: values}, (low, high) price)}})
_DEPARTMENTS: dict[str, tuple[tuple[str, ...], dict[str, dict[str, tuple]]]] = {
    "beauty & personal care": (
        (
            "paraben free", "sulfate free", "cruelty free", "vegan", "fragrance free", "dermatologist tested",
            "natural ingredients", "organic", "alcohol free", "hypoallergenic", "long lasting", "travel size",
            "for sensitive skin", "for dry skin", "for oily skin", "non greasy", "quick absorbing", "refillable",
            "recyclable packaging", "made in usa", "gluten free", "with vitamin e", "with aloe vera",
            "with coconut oil", "with tea tree oil", "with hyaluronic acid", "easy to use", "gift set",
            "salon quality", "for women", "for men", "unisex", "everyday use", "soothing", "lightweight formula",
        ),
        {
            "hair care": {
                "shampoo": (("color safe", "for curly hair", "volumizing", "anti dandruff", "clarifying",
                             "for damaged hair"), {"size": ("8 fl oz", "12 fl oz", "16 fl oz", "32 fl oz"),
                                                   "scent": ("lavender", "coconut", "tea tree", "unscented",
                                                             "citrus")}, (6, 38)),
                "conditioner": (("detangling", "leave in", "deep conditioning", "for frizzy hair", "moisturizing",
                                 "color safe"), {"size": ("8 fl oz", "12 fl oz", "16 fl oz"),
                                                 "scent": ("argan", "rose", "mint", "unscented")}, (6, 34)),
                "hair dryer": (("ionic", "ceramic", "cool shot button", "with diffuser", "foldable handle",
                                "low noise"), {"color": ("black", "white", "rose gold", "pink", "navy")},
                               (20, 120)),
            },
            "skin care": {
                "face moisturizer": (("oil free", "with spf 30", "non comedogenic", "anti aging", "night cream",
                                      "with retinol"), {"size": ("1 oz", "1.7 oz", "2.5 oz", "4 oz")}, (9, 60)),
                "sunscreen": (("broad spectrum", "spf 50", "water resistant", "reef safe", "mineral based",
                               "tinted"), {"size": ("2 fl oz", "3 fl oz", "5 fl oz", "8 fl oz"),
                                           "pack": ("pack of 1", "pack of 2", "pack of 3")}, (8, 40)),
                "face serum": (("with vitamin c", "brightening", "with niacinamide", "firming", "anti wrinkle",
                                "pore minimizing"), {"size": ("0.5 fl oz", "1 fl oz", "2 fl oz")}, (12, 70)),
                "lip balm": (("with shea butter", "tinted", "spf 15", "medicated", "with beeswax", "flavored"),
                             {"flavor": ("mint", "vanilla", "cherry", "honey", "strawberry"),
                              "pack": ("pack of 2", "pack of 4", "pack of 6", "pack of 12")}, (3, 20)),
            },
            "makeup": {
                "lipstick": (("matte finish", "satin finish", "transfer proof", "creamy", "highly pigmented",
                              "moisturizing"), {"color": ("ruby red", "nude", "berry", "coral", "mauve", "plum")},
                             (5, 32)),
                "mascara": (("waterproof", "volumizing", "lengthening", "smudge proof", "clump free",
                             "tubing formula"), {"color": ("black", "brown black", "brown")}, (5, 28)),
            },
            "personal care": {
                "deodorant": (("aluminum free", "baking soda free", "48 hour protection", "clear formula",
                               "stick", "spray"), {"scent": ("citrus", "cedar", "rose", "unscented", "ocean"),
                                                   "pack": ("pack of 1", "pack of 2", "pack of 3")}, (4, 24)),
                "electric toothbrush": (("rechargeable", "with pressure sensor", "with travel case",
                                         "2 minute timer", "5 brushing modes", "sonic"),
                                        {"color": ("white", "black", "blue", "pink", "mint green")}, (20, 120)),
            },
        },
    ),
    "clothing, shoes & jewelry": (
        (
            "machine washable", "hand wash only", "cotton", "polyester", "spandex", "breathable", "moisture wicking",
            "quick drying", "slim fit", "regular fit", "loose fit", "stretchy", "lightweight", "soft fabric",
            "wrinkle free", "for daily wear", "for workout", "for travel", "for summer", "for winter", "casual",
            "classic design", "tag free", "durable", "eco friendly", "with pockets", "long sleeve", "short sleeve",
            "water resistant", "non slip", "gift box", "nickel free", "adjustable", "for women", "for men",
        ),
        {
            "men": {
                "t-shirt": (("crew neck", "v neck", "pre shrunk", "athletic cut", "heavyweight", "graphic print"),
                            {"color": ("white", "black", "navy", "heather grey", "olive", "maroon"),
                             "size": ("small", "medium", "large", "x-large", "xx-large")}, (8, 35)),
                "running shoes": (("arch support", "memory foam insole", "breathable mesh", "wide toe box",
                                   "shock absorbing", "rubber sole"),
                                  {"color": ("black white", "blue", "grey", "red", "all black"),
                                   "size": ("8", "8.5", "9", "9.5", "10", "10.5", "11", "12")}, (30, 140)),
                "jeans": (("straight leg", "relaxed fit", "stretch denim", "dark wash", "button fly",
                           "five pocket"), {"color": ("dark blue", "light blue", "black", "grey"),
                                            "size": ("30w x 30l", "32w x 30l", "32w x 32l", "34w x 32l",
                                                     "36w x 32l")}, (20, 80)),
                "hoodie": (("fleece lined", "pullover", "full zip", "kangaroo pocket", "drawstring hood",
                            "brushed interior"), {"color": ("black", "charcoal", "navy", "forest green", "red"),
                                                  "size": ("small", "medium", "large", "x-large")}, (18, 70)),
            },
            "women": {
                "sundress": (("floral print", "sleeveless", "knee length", "v neck", "smocked waist",
                              "spaghetti strap"), {"color": ("yellow", "sky blue", "pink", "black", "white floral"),
                                                   "size": ("x-small", "small", "medium", "large", "x-large")},
                             (18, 60)),
                "yoga pants": (("high waist", "tummy control", "squat proof", "4 way stretch", "flare leg",
                                "ankle length"), {"color": ("black", "charcoal", "burgundy", "teal", "navy"),
                                                  "size": ("small", "medium", "large", "x-large")}, (14, 50)),
                "blouse": (("button down", "chiffon", "ruffle sleeve", "loose fit", "office wear", "tie neck"),
                           {"color": ("white", "black", "blush", "light blue", "leopard"),
                            "size": ("small", "medium", "large", "x-large")}, (15, 55)),
                "sandals": (("open toe", "arch support", "ankle strap", "platform", "cushioned footbed",
                             "flat"), {"color": ("black", "tan", "white", "brown", "gold"),
                                       "size": ("6", "7", "7.5", "8", "8.5", "9", "10")}, (15, 70)),
            },
            "jewelry & accessories": {
                "necklace": (("sterling silver", "gold plated", "pendant", "adjustable chain", "hypoallergenic",
                              "birthstone"), {"length": ("16 inch", "18 inch", "20 inch", "22 inch")}, (12, 90)),
                "wallet": (("genuine leather", "rfid blocking", "bifold", "slim", "with coin pocket",
                            "card holder"), {"color": ("black", "brown", "tan", "navy")}, (12, 60)),
                "sunglasses": (("polarized", "uv400 protection", "metal frame", "oversized", "aviator",
                                "scratch resistant"), {"color": ("black", "tortoise", "gold brown", "silver blue")},
                               (10, 90)),
            },
        },
    ),
    "electronics": (
        (
            "wireless", "bluetooth 5.3", "fast charging", "usb c", "long battery life", "compact", "portable",
            "lightweight", "durable", "water resistant", "with led indicator", "plug and play", "energy saving",
            "noise cancelling", "high definition", "easy to install", "universal compatibility", "overheat protection",
            "with carrying case", "ergonomic design", "for travel", "for office", "for gaming", "two year warranty",
            "aluminum alloy", "shockproof", "foldable", "magnetic", "dual port", "low latency",
        ),
        {
            "audio": {
                "wireless earbuds": (("with charging case", "touch control", "built in microphone", "ipx7",
                                      "deep bass", "in ear"), {"color": ("black", "white", "navy blue", "rose")},
                                     (20, 160)),
                "bluetooth speaker": (("waterproof", "with microphone", "stereo sound", "outdoor", "rgb lights",
                                       "party mode"), {"color": ("black", "red", "blue", "camo", "teal")},
                                      (18, 130)),
                "headphones": (("over ear", "on ear", "with mic", "foldable headband", "memory foam ear cushions",
                                "hi res audio"), {"color": ("black", "silver", "blue", "white")}, (20, 200)),
            },
            "phone accessories": {
                "phone case": (("slim", "with card holder", "clear back", "wireless charging compatible",
                                "raised edges", "kickstand"),
                               {"color": ("clear", "black", "purple", "green", "pink"),
                                "model": ("iphone 14", "iphone 15", "iphone 15 pro", "galaxy s23", "galaxy s24")},
                               (7, 35)),
                "usb c cable": (("braided", "data transfer", "100w", "right angle", "tangle free",
                                 "6 ft"), {"length": ("3 ft", "6 ft", "10 ft"),
                                           "pack": ("pack of 1", "pack of 2", "pack of 3", "pack of 5")}, (5, 28)),
                "power bank": (("high capacity", "with led display", "pd 20w", "slim design", "airline approved",
                                "with built in cable"), {"capacity": ("5000mah", "10000mah", "20000mah",
                                                                      "26800mah")}, (15, 80)),
                "wall charger": (("gan technology", "dual usb c", "foldable plug", "pd 30w", "multi port",
                                  "compact cube"), {"color": ("white", "black"),
                                                    "pack": ("pack of 1", "pack of 2")}, (10, 50)),
            },
            "computer accessories": {
                "wireless mouse": (("silent click", "rechargeable", "adjustable dpi", "ambidextrous",
                                    "with usb receiver", "vertical"), {"color": ("black", "grey", "white",
                                                                                 "rose gold")}, (8, 60)),
                "keyboard": (("mechanical", "backlit", "full size", "tenkeyless", "quiet keys", "with wrist rest"),
                             {"color": ("black", "white", "grey"),
                              "switch": ("blue switch", "red switch", "brown switch")}, (20, 130)),
                "laptop stand": (("adjustable height", "ventilated", "aluminum", "portable", "non slip pads",
                                  "for 10 to 17 inch laptops"), {"color": ("silver", "space grey", "black")},
                                 (15, 60)),
            },
        },
    ),
    "grocery & gourmet food": (
        (
            "organic", "non gmo", "gluten free", "kosher", "vegan", "keto friendly", "low sugar", "no added sugar",
            "high protein", "low calorie", "sugar free", "plant based", "dairy free", "fair trade", "resealable bag",
            "individually wrapped", "ready to eat", "family size", "bulk pack", "natural flavors",
            "no artificial colors",
            "caffeine free", "paleo friendly", "low sodium", "whole grain", "gift basket", "shelf stable",
            "rich in fiber", "made in usa", "small batch",
        ),
        {
            "beverages": {
                "ground coffee": (("medium roast", "dark roast", "single origin", "low acid", "arabica",
                                   "whole bean"), {"size": ("12 ounce", "24 ounce", "2 pound", "5 pound"),
                                                   "flavor": ("original", "hazelnut", "french vanilla", "mocha")},
                                  (7, 45)),
                "green tea": (("matcha", "loose leaf", "with ginseng", "decaf", "antioxidant rich", "tea bags"),
                              {"flavor": ("jasmine", "matcha", "mint", "lemon", "honey ginger"),
                               "pack": ("20 count", "50 count", "100 count")}, (4, 30)),
                "sparkling water": (("zero calorie", "naturally flavored", "no sweeteners", "in cans",
                                     "with electrolytes", "bpa free cans"),
                                    {"flavor": ("lime", "grapefruit", "berry", "unflavored", "peach"),
                                     "pack": ("pack of 8", "pack of 12", "pack of 24")}, (6, 30)),
            },
            "snacks": {
                "protein bar": (("20g protein", "chewy", "chocolate coated", "whey protein", "meal replacement",
                                 "soft baked"), {"flavor": ("chocolate peanut butter", "cookie dough", "berry",
                                                            "salted caramel", "birthday cake"),
                                                 "pack": ("12 count", "15 count", "24 count")}, (12, 50)),
                "trail mix": (("with dark chocolate", "unsalted", "roasted nuts", "with dried fruit", "crunchy",
                               "snack packs"), {"size": ("1 pound", "2 pound", "3 pound"),
                                                "pack": ("pack of 1", "pack of 6", "pack of 24")}, (6, 35)),
                "beef jerky": (("grass fed", "original recipe", "teriyaki", "spicy", "tender", "hickory smoked"),
                               {"size": ("2.5 ounce", "10 ounce", "16 ounce"),
                                "pack": ("pack of 1", "pack of 3", "pack of 8")}, (8, 45)),
            },
        },
    ),
    "home & kitchen": (
        (
            "easy to clean", "dishwasher safe", "bpa free", "stainless steel", "space saving", "heavy duty",
            "modern design", "eco friendly", "non toxic", "rust resistant", "machine washable", "easy to assemble",
            "for living room", "for bedroom", "for kitchen", "for office", "for gift", "handmade", "premium quality",
            "soft", "durable", "lightweight", "anti slip", "multi purpose", "long lasting", "oeko tex certified",
            "100% cotton", "microfiber", "with lid", "stackable",
        ),
        {
            "bedding & bath": {
                "throw pillow cover": (("velvet", "hidden zipper", "decorative", "set of 2", "boho", "linen"),
                                       {"color": ("mustard", "emerald", "blush", "cream", "navy", "rust"),
                                        "size": ("16 x 16 inch", "18 x 18 inch", "20 x 20 inch")}, (8, 35)),
                "bath towel": (("quick dry", "highly absorbent", "oversized", "turkish cotton", "plush",
                                "hotel quality"), {"color": ("white", "grey", "aqua", "beige", "navy"),
                                                   "pack": ("set of 2", "set of 4", "set of 6")}, (15, 70)),
                "bed sheet set": (("deep pocket", "cooling", "wrinkle resistant", "400 thread count",
                                   "breathable", "fade resistant"), {"color": ("white", "grey", "sage", "navy",
                                                                               "ivory"),
                                                                     "size": ("twin", "full", "queen", "king")},
                                  (20, 90)),
            },
            "kitchen & dining": {
                "water bottle": (("insulated", "leak proof", "with straw lid", "keeps cold 24 hours",
                                  "wide mouth", "sweat proof"), {"color": ("black", "white", "sage", "lavender",
                                                                           "ocean blue"),
                                                                 "capacity": ("18 oz", "24 oz", "32 oz",
                                                                              "40 oz")}, (10, 45)),
                "chef knife": (("german steel", "full tang", "ergonomic handle", "razor sharp", "8 inch",
                                "with sheath"), {"color": ("black", "wood", "silver")}, (15, 110)),
                "non stick pan": (("induction compatible", "oven safe", "pfoa free", "granite coating",
                                   "with glass lid", "even heating"), {"size": ("8 inch", "10 inch", "12 inch"),
                                                                       "color": ("black", "grey", "cream")},
                                  (18, 80)),
            },
            "furniture & decor": {
                "desk lamp": (("dimmable", "with usb port", "eye caring", "touch control", "flexible gooseneck",
                               "with night light"), {"color": ("black", "white", "silver", "wood")}, (16, 70)),
                "storage bin": (("foldable", "with handles", "fabric", "clear", "collapsible",
                                 "for closet"), {"color": ("grey", "beige", "navy", "white"),
                                                 "pack": ("pack of 3", "pack of 4", "pack of 6")}, (12, 50)),
                "picture frame": (("wall mounting", "tabletop", "real glass", "mat included", "rustic wood",
                                   "gallery style"), {"color": ("black", "white", "natural wood", "gold"),
                                                      "size": ("4 x 6 inch", "5 x 7 inch", "8 x 10 inch",
                                                               "11 x 14 inch")}, (8, 45)),
            },
        },
    ),
}

_BRANDS = (
    "Acorn", "Alder", "Aster", "Beacon", "Birch", "Brightline", "Cascade", "Cedar & Co", "Copperleaf", "Dovetail",
    "Elmwood", "Evergreen", "Fieldstone", "Foxglove", "Granite", "Greyson", "Harbor", "Hollow Pine", "Iris Lane",
    "Ironbark", "Juniper", "Kestrel", "Lark", "Lumen", "Maple Row", "Meadow", "Northwind", "Oakridge", "Orchard",
    "Pinecrest", "Quill", "Redwood", "Riverside", "Saltmarsh", "Summit", "Thistle", "Tidewater", "Umbra",
    "Vantage", "Willow", "Yardley", "Zenith",
)  # fmt: skip
_LINES = ("Essential", "Classic", "Everyday", "Pro", "Original", "Select", "Signature", "Prime", "Studio", "Core")
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def attribute_pool() -> set[str]:
    """Every attribute a product can have (the distinct attributes goals draw from)."""
    pool: set[str] = set()
    for shared, aisles in _DEPARTMENTS.values():
        pool.update(shared)
        for types in aisles.values():
            for own, _, _ in types.values():
                pool.update(own)
    return pool


@dataclass(frozen=True)
class Family:
    """Near-duplicate products: the same line and attributes, different prices and offered option values."""

    product_type: str
    attributes: tuple[str, ...]
    members: tuple[str, ...]  # ASINs


def _goal_attribute_count(rng: random.Random, available: int) -> int:
    """2-15 attributes, mostly 2-6, as real WebShop goals."""
    k = 2 + min(13, int(rng.expovariate(1 / 2.5)))
    return max(2, min(k, available))


class FamilyCatalogue(SearchIndex):
    """The ``realistic`` catalogue: product families of near-duplicates (see the module docstring)."""

    def __init__(self, seed: int = CATALOGUE_SEED):
        rng = random.Random(seed)
        products: list[Product] = []
        self.families: list[Family] = []
        self.family_of: dict[str, int] = {}
        used: set[str] = set()
        brands = iter(rng.sample(_BRANDS * 10, len(_BRANDS) * 10))
        for dept, (shared, aisles) in _DEPARTMENTS.items():
            for aisle, types in aisles.items():
                for ptype, (own, groups, (lo, hi)) in types.items():
                    pool = list(own) + list(shared)
                    for _ in range(FAMILIES_PER_TYPE):
                        brand, line = next(brands), rng.choice(_LINES)
                        core = tuple(sorted(rng.sample(list(own), 3) + rng.sample(list(shared), rng.randint(5, 12))))
                        base_price = rng.uniform(lo, hi)
                        members = []
                        for _ in range(FAMILY_SIZE):
                            asin = "B0" + "".join(rng.choice(_ALPHABET) for _ in range(8))
                            while asin in used:
                                asin = "B0" + "".join(rng.choice(_ALPHABET) for _ in range(8))
                            used.add(asin)
                            extras = rng.sample([a for a in pool if a not in core], rng.randint(0, 3))
                            attrs = tuple(sorted(set(core) | set(extras)))
                            options = []
                            for g, values in groups.items():
                                keep = set(rng.sample(values, rng.randint(1, max(1, len(values) // 2))))
                                options.append((g, tuple(v for v in values if v in keep)))
                            price = round(base_price * rng.uniform(0.7, 1.4), 2)
                            model = "".join(rng.choice(_ALPHABET) for _ in range(4))
                            shown = ", ".join(a.title() for a in core[:2])
                            title = f"{brand} {line} {ptype.title()} {model}, {shown}"
                            description = (f"The {brand} {line} {ptype} is {', '.join(attrs[:-1])} and {attrs[-1]}. "
                                           f"Part of the {line} line from {brand}.")
                            features = tuple(f"{a.capitalize()}." for a in attrs)
                            products.append(Product(asin, title, dept, aisle, ptype, attrs, tuple(options), price,
                                                    description, features))
                            members.append(asin)
                            self.family_of[asin] = len(self.families)
                        self.families.append(Family(ptype, core, tuple(members)))
        order = list(range(len(products)))
        rng.shuffle(order)  # siblings are not adjacent in catalogue order (the search's tie-break)
        self.products = tuple(products[i] for i in order)
        self.by_asin = {p.asin: p for p in self.products}
        self._build_index()

    def goal(self, task_id: int) -> Goal:
        """A random family; the member, option values and price ceiling that the fewest siblings also satisfy
        (ties at random); some of the family's attributes."""
        rng = random.Random(f"webshop-family-goal/{task_id}")
        family = self.families[self.family_of[rng.choice(self.products).asin]]
        attrs = tuple(sorted(rng.sample(family.attributes, _goal_attribute_count(rng, len(family.attributes)))))
        members = [self.by_asin[a] for a in family.members]
        best = None
        for target in rng.sample(members, len(members)):
            ceiling = float(math.ceil(target.price * rng.uniform(1.0, 1.05)))
            affordable = [dict(s.options) for s in members if s is not target and s.price <= ceiling]
            combos = list(itertools.product(*[[(group, v) for v in values] for group, values in target.options]))
            rng.shuffle(combos)
            for combo in combos:
                also = sum(all(v in offered[g] for g, v in combo) for offered in affordable)
                if best is None or also < best[0]:
                    best = (also, target, combo, ceiling)
        _, target, options, ceiling = best
        return Goal(
            instruction=_phrase(rng, target.product_type, attrs, tuple(options), ceiling),
            product_type=target.product_type,
            category=target.category,
            attributes=attrs,
            options=tuple(options),
            price_upper=ceiling,
            target_asin=target.asin,
        )


def _phrase(rng: random.Random, ptype: str, attrs, options, ceiling: float) -> str:
    opener = rng.choice(("i am looking for", "i need", "i want to buy", "find me", "i would like", "get me"))
    plain = [a for a in attrs if not a.startswith(("for ", "with "))]
    trailing = [a for a in attrs if a.startswith(("for ", "with "))]
    text = f"{opener} {', '.join(plain)} {ptype}" if plain else f"{opener} a {ptype}"
    if trailing:
        text += " " + " ".join(trailing)
    if options:
        text += " with " + ", and ".join(f"{group}: {value}" for group, value in options)
    return f"{text}, and price lower than {ceiling:.2f} dollars"
