"""MIMIC-CXR (PhysioNet): the JPG release and the DICOM release, listed from the JPG release's metadata.

Layout (MIMIC-CXR-JPG 2.0.0 and 2.1.0, which keep the 2.0.0 file names; MIMIC-CXR 2.0.0/2.1.0 for DICOM):
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg   (JPG release)
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm   (DICOM release)
i.e. files/p<first 2 digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.<ext>.
Metadata (JPG release root, plain or .csv.gz):
    mimic-cxr-2.0.0-metadata.csv: dicom_id, subject_id, study_id, PerformedProcedureStepDescription,
        ViewPosition, Rows, Columns, StudyDate, StudyTime, ProcedureCodeSequence_CodeMeaning,
        ViewCodeSequence_CodeMeaning, PatientOrientationCodeSequence_CodeMeaning. Used: the ids, ViewPosition
        (PA, AP, LATERAL, LL, AP AXIAL, ... or blank).
    mimic-cxr-2.0.0-chexpert.csv / -negbio.csv: subject_id, study_id and the 14 CheXpert observations per
        study, each 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned -> NaN). A study absent from the file
        gets all-NaN labels.
    mimic-cxr-2.0.0-split.csv: dicom_id, study_id, subject_id, split (train / validate / test), carried as is.
The DICOM release has no ViewPosition table of its own, so pass the JPG release's folder as `metadata`.
"""

from collections.abc import Iterator

from etils import epath

from data_prep.sources.base import CHEXPERT_LABELS, Source, SourceItem, find_file, label_vector, read_csv

PREFIX = "mimic-cxr-2.0.0-"
LABELERS = ("chexpert", "negbio")


class MimicCxrJpg(Source):
    """MIMIC-CXR-JPG images; `labeler` picks the chexpert or negbio label table."""

    name = "mimic_cxr_jpg"
    label_names = CHEXPERT_LABELS
    EXT = ".jpg"

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        labeler: str = "chexpert",
        **options,
    ):
        super().__init__(root, metadata, **options)
        if labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
        self.labeler = labeler

    def relpath(self, subject_id: str, study_id: str, dicom_id: str) -> str:
        return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}{self.EXT}"

    def candidates(self) -> Iterator[SourceItem]:
        labels = {
            row["study_id"]: label_vector(row, self.label_names)
            for row in read_csv(find_file(self.metadata, f"{PREFIX}{self.labeler}.csv"))
        }
        splits = {row["dicom_id"]: row["split"] for row in read_csv(find_file(self.metadata, f"{PREFIX}split.csv"))}
        for row in read_csv(find_file(self.metadata, f"{PREFIX}metadata.csv")):
            subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
            yield self.item(
                self.relpath(subject, study, dicom),
                patient_id=subject,
                study_id=study,
                image_id=dicom,
                view_position=row.get("ViewPosition", "").strip(),
                split=splits.get(dicom, ""),
                labels=labels.get(study) or label_vector(None, self.label_names),
            )


class MimicCxrDicom(MimicCxrJpg):
    """MIMIC-CXR DICOM images, same ids and metadata as the JPG release."""

    name = "mimic_cxr_dicom"
    EXT = ".dcm"
