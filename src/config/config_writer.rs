//! `[config_writer]`: where ocserv's per-user and per-group config files are written (ocserv.conf
//! `config-per-user` / `config-per-group`), and how many previous versions are kept.

use super::*;

section! {
    "config_writer" => pub struct ConfigWriterConfig {
        /// ocserv's `config-per-user` directory. Not set: no per-user file is written (routes
        /// and DNS of decisions are then not applied). An absolute path.
        per_user_dir: Option<PathBuf> = None,
        /// ocserv's `config-per-group` directory. Not set: no per-group file is written. An
        /// absolute path, not `per_user_dir`.
        per_group_dir: Option<PathBuf> = None,
        /// Previous versions of a file kept (in the directory's `.backups/`) when it is
        /// rewritten; `0` keeps none, at most 64 (`peruser::write::MAX_BACKUPS`).
        backups: u32 = 3, in 0..=64,
    }
}

impl ConfigWriterConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.per_user_dir {
            absolute("config_writer.per_user_dir", p)?;
        }
        if let Some(p) = &self.per_group_dir {
            absolute("config_writer.per_group_dir", p)?;
            if self.per_user_dir.as_ref() == Some(p) {
                let why = format!(
                    "must differ from config_writer.per_user_dir ({})",
                    p.display()
                );
                return fail("config_writer.per_group_dir", why);
            }
        }
        Ok(())
    }
}
