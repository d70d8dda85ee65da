"""MMLU's 57 subjects, their subcategories and the four top-level categories (Hendrycks et al., 2021).

This is the grouping of the original release's ``categories.py``: each subject has one subcategory
(``"math"``, ``"health"``, ...) and each subcategory belongs to one of four categories. Counts: STEM 18
subjects, humanities 13, social sciences 12, other 14. The one home of these constants in qlorakit.
"""

from __future__ import annotations

STEM, HUMANITIES, SOCIAL_SCIENCES, OTHER = "STEM", "humanities", "social sciences", "other"
#: The four categories, in the order tables list them.
CATEGORIES: tuple[str, ...] = (STEM, HUMANITIES, SOCIAL_SCIENCES, OTHER)

#: subcategory -> category (the original names "other" in full as "other (business, health, misc.)").
SUBCATEGORY_CATEGORY: dict[str, str] = {
    "physics": STEM, "chemistry": STEM, "biology": STEM, "computer science": STEM, "math": STEM,
    "engineering": STEM,
    "history": HUMANITIES, "philosophy": HUMANITIES, "law": HUMANITIES,
    "politics": SOCIAL_SCIENCES, "culture": SOCIAL_SCIENCES, "economics": SOCIAL_SCIENCES,
    "geography": SOCIAL_SCIENCES, "psychology": SOCIAL_SCIENCES,
    "other": OTHER, "business": OTHER, "health": OTHER,
}

#: subject (file-name spelling) -> subcategory, all 57 subjects.
SUBJECT_SUBCATEGORY: dict[str, str] = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}

#: subject -> one of ``CATEGORIES``.
SUBJECT_CATEGORY: dict[str, str] = {s: SUBCATEGORY_CATEGORY[sub] for s, sub in SUBJECT_SUBCATEGORY.items()}
