"""Report text of a study: findings stated or negated in varied wording, normal sentences,
and header PHI repeated in the text, so that de-identification has work to do."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hlip.synth.studies import Study

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")  # fmt: skip


def _date_text(da: str, style: int) -> str:
    """A DA value written as reports write dates."""
    y, m, d = int(da[:4]), int(da[4:6]), int(da[6:])
    styles = (
        f"{m:02d}/{d:02d}/{y}",
        f"{y}-{m:02d}-{d:02d}",
        f"{MONTHS[m - 1]} {d}, {y}",
        f"{d} {MONTHS[m - 1][:3]} {y}",
        da,
    )
    return styles[style % len(styles)]


def _pick(rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _finding_sentences(label: str, detail: dict | None, rng) -> tuple[str, str]:
    """(findings sentence, impression sentence or "") for a positive (detail) or negative finding."""
    if detail is None:
        return _pick(rng, NEGATIVE_SENTENCES[label]), ""
    return POSITIVE_SENTENCES[label](detail, rng)


def _nodule_sentences(detail, rng):
    (diameter, lobe), n = detail["nodules"][0], len(detail["nodules"])
    if n > 1:
        return (
            f"Multiple pulmonary nodules, the largest measuring {diameter} mm in the {lobe}.",
            f"{n} pulmonary nodules, largest {diameter} mm in the {lobe}; follow-up CT recommended.",
        )
    return (
        _pick(rng, (f"A {diameter} mm solid nodule in the {lobe}.", f"There is a {diameter} mm pulmonary nodule in the {lobe}.",
                    f"{lobe.capitalize()} nodule measuring {diameter} mm.")),
        f"{diameter} mm {lobe} pulmonary nodule.",
    )  # fmt: skip


def _effusion_sentences(detail, rng):
    size, side = detail["size"], detail["side"]
    noun = "pleural effusions" if side == "bilateral" else "pleural effusion"
    return (
        _pick(rng, (f"{size.capitalize()} {side} {noun}.", f"There is a {size} {side} {noun}.")),
        _pick(rng, (f"{size.capitalize()} {side} {noun}.", f"{size.capitalize()} {side} effusion.")),
    )


def _emphysema_sentences(detail, rng):
    severity = detail["severity"]
    return (
        _pick(rng, (f"{severity.capitalize()} centrilobular emphysema, upper lobe predominant, with scattered bullae.",
                    f"There is {severity} emphysema with bullae in both lungs.")),
        f"{severity.capitalize()} emphysema.",
    )  # fmt: skip


def _mass_sentences(detail, rng):
    d, side, lobe = detail["diameter"], detail["side"], detail["lobe"]
    return (
        _pick(rng, (f"A {d} mm mass in the {side} {lobe} lobe, hyperintense on T2 and FLAIR, with surrounding edema.",
                    f"There is a {d} mm {side} {lobe} mass with vasogenic edema.")),
        f"{d} mm {side} {lobe} mass with edema; further evaluation with contrast is recommended.",
    )  # fmt: skip


def _hemorrhage_sentences(detail, rng):
    d, side, lobe = detail["diameter"], detail["side"], detail["lobe"]
    return (
        _pick(rng, (f"Intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {d} mm, hyperintense on T1.",
                    f"There is a {d} mm {side} {lobe} hematoma.")),
        f"{side.capitalize()} {lobe} intraparenchymal hemorrhage ({d} mm).",
    )  # fmt: skip


def _ct_hemorrhage_sentences(detail, rng):
    d, side, lobe, density = detail["diameter"], detail["side"], detail["lobe"], detail["density"]
    return (
        _pick(rng, (f"There is a {d} mm hyperdense intraparenchymal hemorrhage in the {side} {lobe} lobe.",
                    f"Acute {side} {lobe} intraparenchymal hematoma measuring {d} mm (about {density} HU).",
                    f"A small focus of hyperdense blood in the {side} {lobe} lobe, {d} mm." if d < 12 else
                    f"{side.capitalize()} {lobe} hematoma of {d} mm with mild surrounding mass effect.")),
        f"Acute {side} {lobe} intraparenchymal hemorrhage ({d} mm).",
    )  # fmt: skip


def _hydrocephalus_sentences(detail, rng):
    degree = detail["degree"]
    return (
        _pick(rng, (f"The lateral ventricles are enlarged, consistent with {degree} hydrocephalus.",
                    f"{degree.capitalize()} hydrocephalus with dilated lateral ventricles.")),
        f"{degree.capitalize()} hydrocephalus.",
    )  # fmt: skip


POSITIVE_SENTENCES: dict[str, Callable] = {
    "lung_nodule": _nodule_sentences,
    "pleural_effusion": _effusion_sentences,
    "emphysema": _emphysema_sentences,
    "mass": _mass_sentences,
    "hemorrhage": _hemorrhage_sentences,
    "hydrocephalus": _hydrocephalus_sentences,
    "intracranial_hemorrhage": _ct_hemorrhage_sentences,
}
NEGATIVE_SENTENCES = {
    "lung_nodule": (
        "No pulmonary nodules.",
        "There is no evidence of a pulmonary nodule.",
        "No lung nodule or mass is seen.",
    ),
    "pleural_effusion": (
        "No pleural effusion.",
        "There is no evidence of pleural effusion.",
        "The pleural spaces are clear.",
    ),
    "emphysema": (
        "No emphysema.",
        "There is no evidence of emphysema.",
        "The lung parenchyma shows no emphysematous change.",
    ),
    "mass": ("No intracranial mass.", "There is no evidence of a mass lesion.", "No space-occupying lesion."),
    "hemorrhage": (
        "No intracranial hemorrhage.",
        "There is no evidence of hemorrhage.",
        "No blood products are seen.",
    ),
    "hydrocephalus": (
        "No hydrocephalus.",
        "The ventricles are normal in size.",
        "There is no evidence of hydrocephalus.",
    ),
    "intracranial_hemorrhage": (
        "No intracranial hemorrhage.",
        "There is no evidence of acute hemorrhage.",
        "No hyperdense blood is seen.",
    ),
}
NORMAL_SENTENCES = {
    "CT": ("The heart is normal in size.", "No mediastinal or hilar lymphadenopathy.", "The central airways are patent.",
           "The osseous structures are unremarkable.", "The visualized upper abdomen is unremarkable."),
    "MR": ("No midline shift.", "The major intracranial flow voids are preserved.", "The cerebellum and brainstem are normal.",
           "The orbits and paranasal sinuses are unremarkable."),
    "CT-HEAD": ("The ventricles are normal in size.", "No midline shift.", "The gray-white matter differentiation is preserved.",
                "The calvarium is intact."),
}  # fmt: skip
INDICATIONS = {
    "CT": ("Cough.", "Shortness of breath.", "Weight loss.", "Chest pain.", "Staging."),
    "MR": ("Headache.", "Dizziness.", "Seizure.", "Memory loss.", "Visual disturbance."),
    "CT-HEAD": ("Fall.", "Sudden headache.", "Confusion.", "Head trauma.", "Weakness of one side."),
}
EXAMS = {"CT": "CT CHEST", "MR": "MRI BRAIN WITHOUT CONTRAST", "CT-HEAD": "CT HEAD WITHOUT CONTRAST"}
TECHNIQUES = {
    "CT": "Axial images of the chest.",
    "MR": "Sagittal T1, axial T2 and FLAIR images of the brain.",
    "CT-HEAD": "Axial images of the head without contrast.",
}


def report_sections(study: Study) -> list[tuple[str, str]]:
    """The report as (heading, text) sections, with header PHI repeated in the text."""
    rng = study.rng
    findings, impressions = [], []
    for label in study.labels:
        finding, impression = _finding_sentences(label, study.details.get(label), rng)
        if impression or rng.random() > 0.15:  # negatives are sometimes not mentioned
            findings.append(finding)
        if impression:
            impressions.append(impression)
    findings += [s for s in NORMAL_SENTENCES[study.kind] if rng.random() < 0.6]
    if not impressions:
        impressions = [_pick(rng, ("No acute abnormality.", "Normal study.", "No significant abnormality."))]
    exam = EXAMS[study.kind]
    if study.kind == "CT":
        exam += " WITH CONTRAST" if study.contrast else " WITHOUT CONTRAST"
    date = _date_text(study.study_date, study.index)
    referring = _pick(
        rng, (f"Dr. {study.referring.plain}", f"Dr. {study.referring.family}", study.referring.pn)
    )
    history = f"{_pick(rng, INDICATIONS[study.kind])} Referred by {referring}."
    if study.index % 2:
        history += (
            f" Patient {study.patient.family.upper()}, {study.patient.given.upper()}, MRN {study.patient_id}."
        )
    return [
        ("EXAMINATION", f"{exam}, {date}. Accession {study.accession}."),
        ("CLINICAL INFORMATION", history),
        ("TECHNIQUE", TECHNIQUES[study.kind]),
        ("COMPARISON", "None."),
        ("FINDINGS", "\n".join(findings)),
        (
            "IMPRESSION",
            "\n".join(f"{i}. {s}" if len(impressions) > 1 else s for i, s in enumerate(impressions, 1)),
        ),
        (
            "",
            f"Dictated by Dr. {study.reader.given} {study.reader.family}, {study.institution}, on {_date_text(study.study_date, study.index + 2)}.",
        ),
    ]


def report_text(sections: list[tuple[str, str]], capitals: bool) -> str:
    parts = []
    for heading, text in sections:
        title = heading if capitals else heading.capitalize()
        parts.append(f"{title}:\n{text}" if heading else text)
    return "\n\n".join(parts)


def phi_strings(study: Study) -> dict[str, str]:
    """The study's fake PHI, as in the headers."""
    return {
        "PatientName": study.patient.pn,
        "PatientID": study.patient_id,
        "PatientBirthDate": study.birth_date,
        "StudyDate": study.study_date,
        "AccessionNumber": study.accession,
        "ReferringPhysicianName": study.referring.pn,
        "NameOfPhysiciansReadingStudy": study.reader.pn,
        "InstitutionName": study.institution,
        "StudyInstanceUID": study.uid,
    }


def phi_variants(study: Study) -> list[str]:
    """Every PHI string of the study, as headers and reports write it."""
    people = (study.patient, study.referring, study.reader)
    names = [
        v
        for p in people
        for v in (p.pn, p.plain, f"{p.family}, {p.given}", f"{p.family.upper()}, {p.given.upper()}")
    ]
    dates = [_date_text(study.study_date, s) for s in range(5)] + [study.birth_date]
    return [*phi_strings(study).values(), *names, *dates]
