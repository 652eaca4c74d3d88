"""The generated dermatology taxonomy: 16 coarse categories, 53 fine conditions.

Each coarse category has a strong visual cue (a colour family and a shape family: soft
patches, sharp scaly plaques, rings, vesicle clusters, a single dark spot, scattered papules,
wheals, skin-tone patches, pearly domes, purple marks, skin-coloured domes, violaceous
papules, blisters, streaks, craters); each fine condition varies it more subtly (size,
count, border regularity, texture, a secondary colour). Layers are drawn in lesion units
(1 unit = 19 % of the image side) by `derm.py`; a colour may be ("skin", factor, delta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Layer = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Condition:
    coarse: str
    weight: float  # relative frequency of cases (long tail)
    look: str  # lay description of the appearance
    layers: tuple[Layer, ...]
    urgent: bool = False
    sites: tuple[str, ...] = ()  # preferred body sites; default: the coarse category's
    itch: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


SITES = ("Face", "Arm", "Hand", "Trunk", "Back", "Leg", "Foot")
COARSE_SITES = {
    "Eczema/Dermatitis": ("Arm", "Hand", "Face", "Leg"),
    "Acne/Rosacea": ("Face", "Back", "Trunk"),
    "Ulcer": ("Leg", "Foot", "Back"),
    "Pigmentary disorder": ("Face", "Hand", "Arm", "Trunk"),
    "Scar/Keloid": ("Trunk", "Arm", "Back"),
}

ECZ, PSO, INF, VIR = (208, 100, 95), (222, 112, 104), (204, 96, 58), (200, 88, 96)
PIG, ACN, URT, SCC = (96, 60, 42), (196, 66, 66), (236, 166, 162), (232, 186, 180)
VAS, PAP, BUL, SCA = (150, 36, 78), (150, 86, 128), (236, 214, 148), (198, 128, 122)
ULC, SLOUGH, WHITE = (128, 32, 30), (212, 192, 112), (234, 230, 226)
SKIN_DOME = ("skin", 0.95, (10, 2, -4))


def _p(**kw: Any) -> Layer:
    return ("patch", kw)


def _r(**kw: Any) -> Layer:
    return ("ring", kw)


def _d(**kw: Any) -> Layer:
    return ("dots", kw)


def _m(**kw: Any) -> Layer:
    return ("dome", kw)


def _s(**kw: Any) -> Layer:
    return ("scale", kw)


def _l(**kw: Any) -> Layer:
    return ("lines", kw)


def _k(**kw: Any) -> Layer:
    return ("streak", kw)


C = Condition
CONDITIONS: dict[str, Condition] = {
    # -- Eczema/Dermatitis: ill-defined pink-red patches with fine scale --------------------
    "Atopic dermatitis": C("Eczema/Dermatitis", 9, "itchy dry red patches", (
        _p(color=ECZ, count=3, size=0.8, spread=1.1, irr=0.45, soft=0.35, alpha=0.75),
        _s(color=WHITE, alpha=0.35, density=0.6)), itch=0.95),
    "Contact dermatitis": C("Eczema/Dermatitis", 6, "red rash with tiny blisters", (
        _p(color=ECZ, size=1.5, irr=0.12, soft=0.15, aspect=(0.35, 0.5), alpha=0.8),
        _d(color=(238, 205, 195), count=12, radius=0.07, spread=0.6, alpha=0.8)), itch=0.9),
    "Seborrheic dermatitis": C("Eczema/Dermatitis", 4, "greasy yellowish flaky red skin", (
        _p(color=ECZ, count=2, size=1.0, soft=0.35, irr=0.35, spread=0.7, alpha=0.6),
        _s(color=(226, 200, 128), alpha=0.7, density=1.0)), sites=("Face", "Trunk")),
    "Stasis dermatitis": C("Eczema/Dermatitis", 2, "brownish red scaly skin on the shin", (
        _p(color=ECZ, size=1.9, soft=0.45, irr=0.3, alpha=0.6),
        _p(color=(132, 80, 55), size=1.4, soft=0.5, irr=0.4, alpha=0.45),
        _s(color=WHITE, alpha=0.35, density=0.5)), sites=("Leg",)),
    # -- Psoriasis: sharply demarcated salmon plaques, silvery scale -------------------------
    "Plaque psoriasis": C("Psoriasis", 6, "thick red plaques with silvery scale", (
        _p(color=PSO, count=2, size=1.1, irr=0.25, soft=0.05, spread=0.8, alpha=0.92),
        _s(color=(236, 234, 232), alpha=0.8, density=1.6)), sites=("Arm", "Leg", "Back")),
    "Guttate psoriasis": C("Psoriasis", 2, "many small scaly red drops", (
        _d(color=PSO, count=22, radius=0.2, layout="field", soft=0.05, alpha=0.92),
        _s(color=(236, 234, 232), alpha=0.8, density=1.6)), sites=("Trunk", "Back", "Leg")),
    "Inverse psoriasis": C("Psoriasis", 1.2, "smooth shiny red patch in a skin fold", (
        _p(color=PSO, size=1.6, irr=0.2, soft=0.08, alpha=0.9),
        _s(color=(236, 234, 232), alpha=0.35, density=0.4)), sites=("Trunk",)),
    # -- Infection: red-orange rings ---------------------------------------------------------
    "Tinea": C("Infection", 6, "red scaly ring that is spreading", (
        _r(color=INF, count=2, size=1.1, width=0.2, irr=0.2, soft=0.08, spread=0.8),
        _s(color=WHITE, alpha=0.4, density=0.6)), itch=0.8),
    "Impetigo": C("Infection", 3, "honey-coloured crusts on a red sore", (
        _r(color=INF, size=0.9, width=0.4, irr=0.3, soft=0.1),
        _d(color=(212, 160, 58), count=9, radius=0.16, spread=0.55, soft=0.05, alpha=0.9)),
        sites=("Face", "Arm", "Hand")),
    "Cellulitis": C("Infection", 3, "painful hot swollen red area", (
        _p(color=INF, size=2.3, soft=0.6, irr=0.3, alpha=0.55),
        _r(color=INF, size=2.0, width=0.16, soft=0.3, irr=0.3, alpha=0.45)),
        urgent=True, sites=("Leg", "Arm", "Foot"), itch=0.1),
    "Folliculitis": C("Infection", 3, "small red bumps around hairs", (
        _r(color=INF, count=14, size=0.2, width=0.5, soft=0.05, layout="field"),
        _d(color=(240, 226, 170), count=8, radius=0.06, layout="field")),
        sites=("Back", "Leg", "Trunk")),
    # -- Viral: grouped pale vesicles / pearly papules ---------------------------------------
    "Herpes simplex": C("Viral infection", 2.5, "cluster of small painful blisters", (
        _p(color=VIR, size=0.7, soft=0.25, alpha=0.6),
        _d(color=(240, 218, 208), count=10, radius=0.13, spread=0.4, highlight=0.5)),
        sites=("Face",)),
    "Herpes zoster": C("Viral infection", 1.5, "painful band of blisters on one side", (
        _d(color=VIR, count=6, radius=0.45, layout="band", soft=0.3, alpha=0.55),
        _d(color=(240, 218, 208), count=28, radius=0.11, layout="band", highlight=0.5)),
        urgent=True, sites=("Trunk", "Back"), itch=0.2),
    "Molluscum contagiosum": C("Viral infection", 2, "small pearly bumps with a dimple", (
        _d(color=(238, 214, 206), count=10, radius=0.14, spread=1.3, highlight=0.6,
           head=(150, 112, 102), head_size=0.25),), sites=("Trunk", "Arm", "Face")),
    "Viral wart": C("Viral infection", 4, "rough grey bump with black dots", (
        _m(color=(222, 204, 190), count=2, size=0.45, spread=0.8, highlight=0.5, irr=0.3),
        _s(color=(150, 128, 116), alpha=0.5, density=1.4),
        _d(color=(55, 40, 40), count=6, radius=0.04, spread=0.5)), sites=("Hand", "Foot")),
    # -- Pigmented lesion: one dark spot -----------------------------------------------------
    "Melanocytic nevus": C("Pigmented lesion", 8, "small round brown mole", (
        _p(color=PIG, size=0.45, irr=0.05, soft=0.08, aspect=(0.85, 1.0), alpha=0.95),),
        sites=("Trunk", "Back", "Arm", "Face", "Leg"), itch=0.05),
    "Melanoma": C("Pigmented lesion", 1, "changing mole with uneven colours and edges", (
        _p(color=PIG, size=0.95, irr=0.55, soft=0.1, alpha=0.95),
        _p(color=(36, 26, 26), size=0.45, irr=0.5, soft=0.1, offset=0.3, alpha=0.9),
        _p(color=(96, 106, 126), size=0.35, irr=0.5, soft=0.15, offset=0.35, alpha=0.6),
        _p(color=(152, 72, 56), size=0.3, irr=0.5, soft=0.15, offset=0.4, alpha=0.5)),
        urgent=True, sites=("Back", "Leg", "Trunk", "Arm"), itch=0.2),
    "Seborrheic keratosis": C("Pigmented lesion", 4, "stuck-on waxy brown growth", (
        _p(color=(136, 96, 62), size=0.8, irr=0.15, soft=0.05, aspect=(0.6, 0.8), alpha=0.95),
        _s(color=(82, 56, 40), alpha=0.7, density=1.4),
        _s(color=(200, 170, 130), alpha=0.5, density=0.8)), sites=("Trunk", "Back", "Face")),
    "Solar lentigo": C("Pigmented lesion", 2.5, "flat light brown spot", (
        _p(color=(156, 110, 76), size=0.8, irr=0.3, soft=0.25, alpha=0.75),),
        sites=("Face", "Hand", "Arm"), itch=0.05),
    # -- Acne/Rosacea: scattered small red papules -------------------------------------------
    "Acne vulgaris": C("Acne/Rosacea", 8, "pimples and blackheads", (
        _d(color=ACN, count=20, radius=0.13, layout="field", soft=0.12),
        _d(color=(240, 230, 190), count=6, radius=0.06, layout="field"),
        _d(color=(52, 40, 36), count=8, radius=0.035, layout="field"))),
    "Rosacea": C("Acne/Rosacea", 3, "flushed red cheeks with small bumps", (
        _p(color=(212, 100, 100), size=2.6, soft=0.8, alpha=0.45),
        _l(color=(182, 40, 50), count=10, length=0.8, alpha=0.6),
        _d(color=ACN, count=8, radius=0.12, spread=1.2)), sites=("Face",)),
    "Perioral dermatitis": C("Acne/Rosacea", 1, "tiny red bumps around the mouth", (
        _d(color=ACN, count=22, radius=0.09, layout="arc", soft=0.08),), sites=("Face",)),
    # -- Urticaria/Hypersensitivity: pale raised wheals with a red rim ----------------------
    "Urticaria": C("Urticaria/Hypersensitivity", 5, "raised itchy welts that come and go", (
        _r(color=(216, 96, 102), fill=URT, count=3, size=1.0, width=0.2, irr=0.45,
           soft=0.2, spread=1.3),), itch=0.95),
    "Insect bite": C("Urticaria/Hypersensitivity", 4, "itchy bumps with a tiny central dot", (
        _r(color=(216, 96, 102), fill=URT, count=2, size=0.55, width=0.3, irr=0.2,
           soft=0.15, spread=1.0),
        _d(color=(120, 30, 30), count=2, radius=0.05, spread=1.0)),
        sites=("Leg", "Arm", "Foot"), itch=0.9),
    "Drug eruption": C("Urticaria/Hypersensitivity", 1.5, "widespread red spots after a new"
                       " medicine", (
        _d(color=(222, 112, 122), count=45, radius=0.16, layout="field", soft=0.2,
           alpha=0.8),), urgent=True, sites=("Trunk", "Back"), itch=0.7),
    # -- Pigmentary disorder: skin-tone patches, no redness ---------------------------------
    "Vitiligo": C("Pigmentary disorder", 2.5, "white patches of skin", (
        _p(color=("mix", 0.4, (248, 232, 222)), count=2, size=1.3, irr=0.45, soft=0.06, spread=0.8,
           alpha=0.9),), itch=0.05),
    "Melasma": C("Pigmentary disorder", 2, "brown patches on the cheeks", (
        _p(color=("skin", 0.7, (4, -4, -8)), count=2, size=1.3, irr=0.5, soft=0.3,
           spread=1.0, alpha=0.85),), sites=("Face",), itch=0.05),
    "Post-inflammatory hyperpigmentation": C("Pigmentary disorder", 3, "dark marks after a"
                                             " rash healed", (
        _p(color=("skin", 0.6, (0, -6, -8)), count=4, size=0.5, irr=0.3, soft=0.2,
           spread=1.2, alpha=0.85),), itch=0.1),
    # -- Skin cancer (non-melanoma): pearly domes, central crust ----------------------------
    "Basal cell carcinoma": C("Skin cancer", 2.5, "pearly bump that bleeds and does not heal", (
        _m(color=SCC, size=0.6, highlight=0.6, irr=0.15),
        _l(color=(190, 50, 60), count=4, length=0.45, layout="radial", alpha=0.7),
        _d(color=(120, 40, 40), count=1, radius=0.12, spread=0.0)),
        sites=("Face", "Trunk"), itch=0.1),
    "Squamous cell carcinoma": C("Skin cancer", 1.2, "scaly crusted growth that is growing", (
        _m(color=(216, 150, 140), size=0.8, highlight=0.4, irr=0.3),
        _s(color=(236, 226, 190), alpha=0.8, density=2.0),
        _d(color=(120, 40, 40), count=1, radius=0.16, spread=0.0)),
        urgent=True, sites=("Face", "Hand", "Arm"), itch=0.1),
    "Actinic keratosis": C("Skin cancer", 3, "rough sandpaper-like pink spots", (
        _p(color=(216, 142, 132), count=3, size=0.4, soft=0.1, spread=1.0, alpha=0.85),
        _s(color=(236, 226, 196), alpha=0.7, density=1.5)), sites=("Face", "Hand", "Arm")),
    # -- Vascular: purple-red marks -----------------------------------------------------------
    "Hemangioma": C("Vascular lesion", 2, "soft bright red-purple bump", (
        _m(color=(176, 30, 62), size=0.6, highlight=0.35, irr=0.35),), itch=0.05),
    "Purpura": C("Vascular lesion", 1.5, "purple spots that do not fade when pressed", (
        _p(color=(112, 50, 92), size=1.0, soft=0.4, irr=0.4, alpha=0.5),
        _d(color=(122, 40, 82), count=35, radius=0.06, layout="field")),
        urgent=True, sites=("Leg", "Arm"), itch=0.05),
    "Spider angioma": C("Vascular lesion", 1, "red dot with thin spidery vessels", (
        _d(color=(190, 30, 50), count=1, radius=0.12, spread=0.0),
        _l(color=(186, 44, 62), count=8, length=0.9, layout="radial", alpha=0.8)),
        sites=("Face", "Trunk"), itch=0.05),
    # -- Benign growth: skin-coloured domes ---------------------------------------------------
    "Dermatofibroma": C("Benign growth", 2, "firm small brownish bump", (
        _m(color=("skin", 0.8, (12, -6, -10)), size=0.35, highlight=0.3),
        _d(color=("skin", 1.05, (10, 6, 4)), count=1, radius=0.1, spread=0.0)),
        sites=("Leg", "Arm"), itch=0.1),
    "Skin tag": C("Benign growth", 2.5, "small soft flesh-coloured tags", (
        _m(color=SKIN_DOME, count=4, size=0.15, spread=0.8, highlight=0.4, soft=0.05),),
        sites=("Trunk", "Face"), itch=0.05),
    "Epidermoid cyst": C("Benign growth", 2, "round lump under the skin with a dark pore", (
        _m(color=("skin", 1.02, (8, 4, 0)), size=0.7, highlight=0.5, soft=0.2),
        _d(color=(62, 46, 40), count=1, radius=0.05, spread=0.0)), sites=("Back", "Face")),
    "Lipoma": C("Benign growth", 1.5, "soft painless lump", (
        _m(color=("skin", 1.05, (4, 4, 4)), size=1.5, highlight=0.25, soft=0.7, alpha=0.8),),
        sites=("Back", "Arm", "Trunk"), itch=0.05),
    # -- Papulosquamous: violaceous flat papules / ovals --------------------------------------
    "Lichen planus": C("Papulosquamous", 1.5, "itchy purple flat-topped bumps", (
        _d(color=PAP, count=16, radius=0.2, spread=0.9, soft=0.04, sides=6),
        _l(color=(232, 226, 236), count=6, length=0.25, alpha=0.7)),
        sites=("Arm", "Hand", "Leg"), itch=0.9),
    "Pityriasis rosea": C("Papulosquamous", 1.5, "oval scaly patches after one big patch", (
        _p(color=(172, 100, 136), size=0.8, soft=0.08, aspect=(0.6, 0.7), alpha=0.85),
        _p(color=PAP, count=8, size=0.35, soft=0.08, aspect=(0.4, 0.6), spread=1.6,
           aligned=True, alpha=0.85)), sites=("Trunk", "Back"), itch=0.5),
    # -- Blistering disease: tense yellowish bullae --------------------------------------------
    "Bullous pemphigoid": C("Blistering disease", 0.6, "large tense blisters on red skin", (
        _p(color=(205, 110, 100), size=1.5, soft=0.4, alpha=0.5),
        _m(color=BUL, count=3, size=0.6, spread=1.0, highlight=0.6, alpha=0.85)),
        urgent=True, sites=("Trunk", "Arm", "Leg"), itch=0.8),
    "Pemphigus vulgaris": C("Blistering disease", 0.5, "painful raw sores and fragile"
                            " blisters", (
        _p(color=(190, 60, 60), count=3, size=0.5, irr=0.4, soft=0.1, spread=1.0, alpha=0.85),
        _m(color=BUL, count=2, size=0.5, spread=0.8, highlight=0.4, alpha=0.8),
        _d(color=(170, 112, 60), count=4, radius=0.1, spread=0.9)),
        urgent=True, sites=("Trunk", "Face", "Back"), itch=0.2),
    "Friction blister": C("Blistering disease", 2, "single blister where a shoe rubs", (
        _r(color=(220, 150, 140), size=0.75, width=0.2, soft=0.15),
        _m(color=BUL, count=1, size=0.8, highlight=0.7, alpha=0.85)),
        sites=("Foot", "Hand"), itch=0.1),
    # -- Scar/Keloid: elongated shiny bands ----------------------------------------------------
    "Keloid": C("Scar/Keloid", 1.5, "raised scar growing beyond the wound", (
        _k(color=(166, 96, 90), count=1, length=2.2, width=0.6, highlight=0.35),), itch=0.4),
    "Hypertrophic scar": C("Scar/Keloid", 1.5, "thick pink scar", (
        _k(color=(212, 142, 136), count=1, length=1.8, width=0.4, highlight=0.3),), itch=0.3),
    "Striae": C("Scar/Keloid", 1.5, "stretch marks", (
        _k(color=(206, 172, 188), count=5, length=2.0, width=0.08, highlight=0.1,
           parallel=True),), itch=0.05),
    # -- Ulcer: dark red crater with yellow slough --------------------------------------------
    "Venous ulcer": C("Ulcer", 1.5, "shallow wet sore above the ankle", (
        _p(color=(132, 80, 56), size=2.0, soft=0.5, alpha=0.5),
        _p(color=ULC, size=1.0, irr=0.45, soft=0.05, alpha=0.95),
        _s(color=SLOUGH, alpha=0.8, density=0.9, dot=2.0)), sites=("Leg",), itch=0.3),
    "Pressure ulcer": C("Ulcer", 1, "deep sore over a bony area", (
        _r(color=(200, 130, 120), size=1.0, width=0.3, soft=0.2),
        _p(color=ULC, size=0.8, irr=0.1, soft=0.05, alpha=0.95),
        _p(color=(70, 20, 20), size=0.35, irr=0.2, soft=0.1, alpha=0.9),
        _s(color=SLOUGH, alpha=0.7, density=0.5, dot=2.0)), urgent=True, sites=("Back",),
        itch=0.05),
    "Diabetic foot ulcer": C("Ulcer", 0.8, "punched-out sore on the sole", (
        _r(color=(230, 214, 178), size=0.6, width=0.5, soft=0.1),
        _p(color=ULC, size=0.3, irr=0.1, soft=0.03, alpha=0.95)), urgent=True,
        sites=("Foot",), itch=0.05),
    # -- Other -------------------------------------------------------------------------------
    "Xerosis": C("Other", 2, "very dry cracked skin", (
        _l(color=(236, 226, 216), count=25, length=0.6, layout="field", alpha=0.6),
        _s(color=WHITE, alpha=0.35, density=0.8)), sites=("Leg", "Hand"), itch=0.7),
    "Granuloma annulare": C("Other", 1, "ring of smooth skin-coloured bumps", (
        _d(color=(214, 160, 150), count=14, radius=0.12, layout="ring", highlight=0.3),),
        sites=("Hand", "Arm", "Foot"), itch=0.1),
    "Prurigo nodularis": C("Other", 1, "very itchy hard scratched bumps", (
        _m(color=(166, 106, 92), count=6, size=0.22, spread=1.3, highlight=0.2),
        _d(color=(110, 40, 36), count=6, radius=0.05, spread=1.3)), sites=("Arm", "Leg"),
        itch=0.98),
    "Keratosis pilaris": C("Other", 2, "rough goosebump-like skin", (
        _d(color=(206, 150, 140), count=60, radius=0.05, layout="field"),),
        sites=("Arm", "Leg"), itch=0.2),
}

COARSE = sorted({c.coarse for c in CONDITIONS.values()})


def condition_map() -> dict[str, str]:
    """Fine condition -> coarse category (written as condition_map.json)."""
    return {name: c.coarse for name, c in CONDITIONS.items()}


# Learnability: each coarse category's main lesion layer is drawn in its own clearly
# distinct colour (the category is visible at a glance, even to a tiny model trained from
# scratch), while the fine conditions of a category keep their shapes, sizes, counts and
# secondary layers, so fine conditions stay harder to tell apart than coarse categories.
CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "Eczema/Dermatitis": (230, 40, 40), "Psoriasis": (250, 250, 250),
    "Infection": (250, 150, 20), "Viral infection": (40, 200, 70),
    "Pigmented lesion": (25, 18, 15), "Acne/Rosacea": (250, 120, 200),
    "Urticaria/Hypersensitivity": (240, 230, 40), "Pigmentary disorder": (40, 90, 235),
    "Skin cancer": (130, 40, 210), "Vascular lesion": (140, 20, 50),
    "Benign growth": (40, 220, 220), "Papulosquamous": (20, 110, 110),
    "Blistering disease": (150, 190, 40), "Scar/Keloid": (120, 120, 130),
    "Ulcer": (110, 60, 15), "Other": (20, 35, 110),
}
VISIBLE_ALPHA = 0.92
# Conditions that need an urgent referral show it: a dark, irregular, bleeding-looking rim.
URGENT_RIM: Layer = ("ring", {"color": (70, 8, 12), "size": 1.3, "width": 0.3, "irr": 0.35,
                              "soft": 0.05, "alpha": 0.95})


def visible_layers(name: str) -> tuple[Layer, ...]:
    """The condition's layers with the first drawn in its category's colour (opaque), and
    the urgent rim under them for urgent conditions."""
    cond = CONDITIONS[name]
    (prim, params), rest = cond.layers[0], cond.layers[1:]
    params = {**params, "color": CATEGORY_COLORS[cond.coarse]}
    params["alpha"] = max(params.get("alpha", VISIBLE_ALPHA), VISIBLE_ALPHA)
    rim = (URGENT_RIM,) if cond.urgent else ()
    return (*rim, (prim, params), *rest)
