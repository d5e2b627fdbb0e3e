"""Report text of a study: findings stated or negated in varied wording, normal sentences,
and header PHI repeated in the text, so that de-identification has work to do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def _finding_sentences(study: Study, label: str) -> tuple[str, str]:
    """(findings sentence, impression sentence or "") for a positive or negative finding, in
    the wording of the study's archive."""
    forms, impression, negatives = study.style.wording[label]
    detail = study.details.get(label)
    if detail is None:
        return NEGATIVE_SENTENCES[label][negatives[int(study.rng.integers(len(negatives)))]], ""
    fields = _fields(label, detail)
    pool = POSITIVE_FORMS[label]
    if fields.get("n", 1) > 1:  # several nodules: this archive's form for them
        finding = pool.several[forms[0] % len(pool.several)]
    else:
        finding = pool.findings[forms[int(study.rng.integers(len(forms)))]]
    return _sentence(finding, fields), _sentence(pool.impressions[impression], fields)


def _sentence(form: str, fields: dict) -> str:
    text = form.format(**fields)
    return text[0].upper() + text[1:]


def _fields(label: str, detail: dict) -> dict:
    """The values a finding's sentence forms name: d (mm), side, lobe, n, size, noun, ..."""
    fields = dict(detail)
    if label == "lung_nodule":
        (fields["d"], fields["lobe"]), fields["n"] = detail["nodules"][0], len(detail["nodules"])
    if "diameter" in detail:
        fields["d"] = detail["diameter"]
    if label == "pleural_effusion":
        fields["noun"] = "pleural effusions" if detail["side"] == "bilateral" else "pleural effusion"
    return fields


@dataclass(frozen=True)
class Forms:
    """A positive finding's sentence forms (str.format over :func:`_fields`): for the findings
    section, for several lesions (nodules), and for the impression. Each archive's style uses
    three of the findings forms and one impression form."""

    findings: tuple[str, ...]
    impressions: tuple[str, ...]
    several: tuple[str, ...] = ()


POSITIVE_FORMS: dict[str, Forms] = {
    "lung_nodule": Forms(
        ("A {d} mm solid nodule in the {lobe}.", "There is a {d} mm pulmonary nodule in the {lobe}.",
         "{lobe} nodule measuring {d} mm.", "Solid pulmonary nodule of {d} mm in the {lobe}.",
         "A noncalcified {d} mm nodule is seen in the {lobe}.",
         "Rounded soft-tissue opacity of {d} mm in the {lobe}, in keeping with a nodule."),
        ("{d} mm {lobe} pulmonary nodule.", "Pulmonary nodule, {lobe}, {d} mm; follow-up CT recommended.",
         "Solitary or dominant lung nodule measuring {d} mm."),
        ("Multiple pulmonary nodules, the largest measuring {d} mm in the {lobe}.",
         "{n} solid nodules, the largest {d} mm in the {lobe}.",
         "Several lung nodules; the dominant one measures {d} mm ({lobe})."),
    ),
    "pleural_effusion": Forms(
        ("{size} {side} {noun}.", "There is a {size} {side} {noun}.", "{size} {side} pleural fluid collection.",
         "Dependent fluid in the {side} pleural space, {size}.", "{side} {noun}, {size} in volume."),
        ("{size} {side} {noun}.", "{size} {side} effusion.", "Pleural effusion ({side}, {size})."),
    ),
    "emphysema": Forms(
        ("{severity} centrilobular emphysema, upper lobe predominant, with scattered bullae.",
         "There is {severity} emphysema with bullae in both lungs.",
         "Hyperlucent lungs with {severity} emphysematous change and bullae.",
         "{severity} bullous emphysema of both upper lobes.", "Emphysema, {severity}, with several bullae."),
        ("{severity} emphysema.", "Emphysema ({severity})."),
    ),
    "mass": Forms(
        ("A {d} mm mass in the {side} {lobe} lobe, hyperintense on T2 and FLAIR, with surrounding edema.",
         "There is a {d} mm {side} {lobe} mass with vasogenic edema.",
         "{side} {lobe} space-occupying lesion of {d} mm with perilesional edema.",
         "Intra-axial mass in the {side} {lobe} lobe measuring {d} mm, T2 hyperintense.",
         "A {d} mm lesion with mass effect in the {side} {lobe} lobe."),
        ("{d} mm {side} {lobe} mass with edema; further evaluation with contrast is recommended.",
         "{side} {lobe} intracranial mass ({d} mm)."),
    ),
    "hemorrhage": Forms(
        ("Intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {d} mm, hyperintense on T1.",
         "There is a {d} mm {side} {lobe} hematoma.", "T1-hyperintense blood products of {d} mm in the {side} {lobe} lobe.",
         "A {d} mm subacute hematoma in the {side} {lobe} lobe.",
         "Parenchymal hemorrhage, {side} {lobe}, {d} mm, dark on T2."),
        ("{side} {lobe} intraparenchymal hemorrhage ({d} mm).", "Subacute {side} {lobe} hemorrhage of {d} mm."),
    ),
    "hydrocephalus": Forms(
        ("The lateral ventricles are enlarged, consistent with {degree} hydrocephalus.",
         "{degree} hydrocephalus with dilated lateral ventricles.", "Ventriculomegaly, {degree}, out of proportion to the sulci.",
         "The ventricular system is dilated ({degree} hydrocephalus).", "Enlarged lateral ventricles: {degree} hydrocephalus."),
        ("{degree} hydrocephalus.", "Hydrocephalus ({degree})."),
    ),
    "intracranial_hemorrhage": Forms(
        ("There is a {d} mm hyperdense intraparenchymal hemorrhage in the {side} {lobe} lobe.",
         "Acute {side} {lobe} intraparenchymal hematoma measuring {d} mm (about {density} HU).",
         "A focus of hyperdense blood in the {side} {lobe} lobe, {d} mm.",
         "{side} {lobe} hematoma of {d} mm.", "Hyperdense {d} mm parenchymal bleed, {side} {lobe} lobe."),
        ("Acute {side} {lobe} intraparenchymal hemorrhage ({d} mm).", "Acute intracranial hemorrhage, {side} {lobe}, {d} mm."),
    ),
}  # fmt: skip
NEGATIVE_SENTENCES = {
    "lung_nodule": ("No pulmonary nodules.", "There is no evidence of a pulmonary nodule.", "No lung nodule or mass is seen.",
                    "No suspicious pulmonary nodule.", "The lungs are free of nodules."),
    "pleural_effusion": ("No pleural effusion.", "There is no evidence of pleural effusion.", "The pleural spaces are clear.",
                         "No pleural fluid.", "No effusion."),
    "emphysema": ("No emphysema.", "There is no evidence of emphysema.", "The lung parenchyma shows no emphysematous change.",
                  "Normal lung attenuation without emphysema.", "No bullae or emphysema."),
    "mass": ("No intracranial mass.", "There is no evidence of a mass lesion.", "No space-occupying lesion.",
             "No mass or mass effect.", "No focal intracranial lesion."),
    "hemorrhage": ("No intracranial hemorrhage.", "There is no evidence of hemorrhage.", "No blood products are seen.",
                   "No hematoma.", "No T1-hyperintense blood products."),
    "hydrocephalus": ("No hydrocephalus.", "The ventricles are normal in size.", "There is no evidence of hydrocephalus.",
                      "Ventricular size is normal.", "No ventriculomegaly."),
    "intracranial_hemorrhage": ("No intracranial hemorrhage.", "There is no evidence of acute hemorrhage.", "No hyperdense blood is seen.",
                                "No acute bleed.", "No intraparenchymal hematoma."),
}  # fmt: skip
NORMAL_SENTENCES = {
    "CT": ("The heart is normal in size.", "No mediastinal or hilar lymphadenopathy.", "The central airways are patent.",
           "The osseous structures are unremarkable.", "The visualized upper abdomen is unremarkable.",
           "No pericardial effusion.", "The thoracic aorta is normal in caliber.", "The thyroid gland is unremarkable."),
    "MR": ("No midline shift.", "The major intracranial flow voids are preserved.", "The cerebellum and brainstem are normal.",
           "The orbits and paranasal sinuses are unremarkable.", "No restricted diffusion.",
           "The pituitary gland is normal.", "The basal cisterns are patent."),
    "CT-HEAD": ("The ventricles are normal in size.", "No midline shift.", "The gray-white matter differentiation is preserved.",
                "The calvarium is intact.", "The basal cisterns are patent.", "The mastoid air cells are clear.",
                "No extra-axial collection."),
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
        finding, impression = _finding_sentences(study, label)
        if impression or rng.random() > 0.15:  # negatives are sometimes not mentioned
            findings.append(finding)
        if impression:
            impressions.append(impression)
    normal = NORMAL_SENTENCES[study.kind]
    findings += [normal[i] for i in study.style.normal[study.kind] if rng.random() < 0.6]
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
        for v in (
            p.pn,
            p.plain,
            f"{p.family}, {p.given}",
            f"{p.family.upper()}, {p.given.upper()}",
            f"Dr. {p.family}",
        )
    ]
    dates = [_date_text(study.study_date, s) for s in range(5)] + [study.birth_date]
    return [*phi_strings(study).values(), *names, *dates]
