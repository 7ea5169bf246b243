"""The class names of each downstream task, in the order of its head's outputs.

Below both evaluation (eval/tasks.py reads labels by these names) and conversion (a converted head's
outputs are named by them), so neither imports the other.
"""

from data_prep.sources.nih import NIH_LABELS, NO_FINDING

# The 40 CXR-LT 2024 classes in the released head's order (official notebooks/chexfound_example.ipynb).
CXR_LT_CLASSES = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly", "Clavicle Fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fissure", "Fracture",
    "Granuloma", "Hernia", "Hydropneumothorax", "Infarction", "Infiltration", "Kyphosis", "Lobar Atelectasis",
    "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Normal", "Pleural Effusion", "Pleural Other",
    "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum", "Pneumothorax",
    "Pulmonary Embolism", "Pulmonary Hypertension", "Rib Fracture", "Round(ed) Atelectasis",
    "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta", "Tuberculosis",
)  # fmt: skip
CHEXPERT_COMPETITION = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# The official NIH dataset binarizes Finding Labels with scikit-learn's MultiLabelBinarizer, whose columns are
# the sorted label strings: the 14 findings and "No Finding" (15 columns).
NIH_OFFICIAL_CLASSES = tuple(sorted((*NIH_LABELS, NO_FINDING)))

TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "cxr_lt": CXR_LT_CLASSES,
    "nih": NIH_LABELS,
    "nih_no_finding": NIH_OFFICIAL_CLASSES,
    "chexpert": CHEXPERT_COMPETITION,
    "chexpert_uones": CHEXPERT_COMPETITION,
    "shenzhen": ("Tuberculosis",),
    "montgomery": ("Tuberculosis",),
    "jsrt": ("Nodule",),
}
