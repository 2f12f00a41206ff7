//! Groups: creating one, adding and removing members (the owner hands
//! ownership on when leaving), listing members.

use super::{ChatService, Session, storage_error};
use crate::ids;
use crate::protocol::frames::WireGroup;
use crate::protocol::{ErrorCode, ProtocolError, ServerFrame};
use crate::store::{Group, Join};

impl ChatService {
    /// Drops the cached members of `group` here and on every other gateway.
    pub(super) async fn members_changed(&self, group: &str) {
        self.members.invalidate(group);
        if let Err(e) = self.broker.group_changed(group).await {
            tracing::warn!(%group, error = %e, "membership change not announced; other gateways see it within the cache TTL");
        }
    }

    pub(super) async fn group_reply(&self, req: Option<String>, group: Group) -> Result<ServerFrame, ProtocolError> {
        let members = self.store.members(&group.id).await.map_err(storage_error)?;
        Ok(ServerFrame::Group { req, group: WireGroup { id: group.id, name: group.name, owner: group.owner, members } })
    }

    pub(super) async fn existing_group(&self, id: &str) -> Result<Group, ProtocolError> {
        self.store
            .group(id)
            .await
            .map_err(storage_error)?
            .ok_or_else(|| ProtocolError::new(ErrorCode::NoSuchGroup, format!("no group {id}")))
    }

    pub(super) async fn create_group(
        &self,
        session: &Session,
        req: Option<String>,
        name: String,
        members: Vec<String>,
    ) -> Result<ServerFrame, ProtocolError> {
        let mut all = vec![session.user.clone()];
        all.extend(members);
        all.sort();
        all.dedup();
        self.check_may_mint_ids()?;
        let group = Group {
            id: format!("g:{}", self.ids.next_id()),
            name,
            owner: session.user.clone(),
            created_at_ms: ids::now_ms(),
        };
        self.store.create_group(&group, &all).await.map_err(storage_error)?;
        self.group_reply(req, group).await
    }

    pub(super) async fn add_member(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
        user: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        self.channel_members(&session.user, &group_id).await?;
        let max = self.config.limits.max_group_members;
        match self.store.join(&group_id, &user, max).await.map_err(storage_error)? {
            Join::Added => self.members_changed(&group_id).await,
            Join::AlreadyMember => {}
            Join::Full { members } => {
                return Err(ProtocolError::new(
                    ErrorCode::GroupFull,
                    format!("{group_id} has {members} members, the maximum is {max}"),
                ));
            }
        }
        self.group_reply(req, group).await
    }

    pub(super) async fn remove_member(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
        user: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        self.channel_members(&session.user, &group_id).await?;
        // Anyone may leave; only the owner removes others.
        if user != session.user && group.owner != session.user {
            return Err(ProtocolError::new(ErrorCode::Forbidden, "only the group's owner removes other members"));
        }
        self.store.remove_member(&group_id, &user).await.map_err(storage_error)?;
        self.members_changed(&group_id).await;
        let group = if user == group.owner { self.hand_ownership_on(group).await? } else { group };
        self.group_reply(req, group).await
    }

    /// The owner left: the remaining member whose id sorts first owns the
    /// group now (none left: the group keeps its last owner, who may join
    /// again only if added, which nobody can).
    pub(super) async fn hand_ownership_on(&self, mut group: Group) -> Result<Group, ProtocolError> {
        let members = self.store.members(&group.id).await.map_err(storage_error)?;
        if let Some(next) = members.first() {
            self.store.set_owner(&group.id, next).await.map_err(storage_error)?;
            tracing::debug!(group = %group.id, from = %group.owner, to = %next, "the owner left; ownership handed on");
            group.owner = next.clone();
        }
        Ok(group)
    }

    pub(super) async fn list_members(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        self.channel_members(&session.user, &group_id).await?;
        self.group_reply(req, group).await
    }
}
