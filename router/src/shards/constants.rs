//! The constants of a statement text, by ordinal: where each one is, for
//! reading a sharding key from the text without parsing it again.

/// Maps sqlparser's value positions (line, column) to constant ordinals.
pub struct Constants {
    /// Per line, where each character starts (columns count characters).
    lines: Vec<Line>,
    /// Start offsets of the constants, in order.
    starts: Vec<usize>,
    text_len: usize,
}

/// Where a line's characters start: ASCII lines by arithmetic (no per
/// character table, so a 32 MB string constant costs nothing here).
pub(super) enum Line {
    Ascii { start: usize, end: usize },
    Chars(Vec<usize>),
}

impl Line {
    fn offset(&self, col: usize) -> Option<usize> {
        match self {
            Line::Ascii { start, end } => Some(start + col).filter(|o| o < end),
            Line::Chars(offsets) => offsets.get(col).copied(),
        }
    }
}

impl Constants {
    pub fn new(sql: &str) -> Constants {
        let mut lines = Vec::new();
        let mut start = 0;
        for piece in sql.split_inclusive('\n') {
            let end = start + piece.len();
            lines.push(if piece.is_ascii() {
                Line::Ascii { start, end }
            } else {
                Line::Chars(piece.char_indices().map(|(i, _)| start + i).collect())
            });
            start = end;
        }
        if sql.is_empty() || sql.ends_with('\n') {
            // The (empty) line after the last newline.
            lines.push(Line::Ascii { start, end: start });
        }
        let mut starts = Vec::new();
        crate::lexer::scan_constants(sql, |s, _| starts.push(s));
        Constants {
            lines,
            starts,
            text_len: sql.len(),
        }
    }

    pub(super) fn ordinal(&self, span: sqlparser::tokenizer::Span) -> Option<u16> {
        let offset = |l: sqlparser::tokenizer::Location| -> Option<usize> {
            let line = self.lines.get((l.line as usize).checked_sub(1)?)?;
            let col = (l.column as usize).checked_sub(1)?;
            Some(line.offset(col).unwrap_or(self.text_len))
        };
        let (start, end) = (offset(span.start)?, offset(span.end)?);
        let i = self.starts.partition_point(|&s| s < start);
        let s = *self.starts.get(i)?;
        (s <= end.max(start)).then_some(i as u16)
    }
}
